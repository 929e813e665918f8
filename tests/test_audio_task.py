"""The ``audio_classification`` task: wav/flac files, bytes and arrays; tiny Wav2Vec2, HuBERT and Whisper trained through a recipe."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from adaptkit.data.load import load_data
from adaptkit.errors import ConfigError, DataError
from adaptkit.recipe.schema import DataSpec, load_recipe
from adaptkit.testing import save_tiny_pretrained

RATE = 16000
#: The two classes: a low and a high tone (with harmonics and noise), easy to tell apart.
TONES = {"low": 300.0, "high": 1500.0}
#: How each training clip is stored, in turn: exercising both formats, resampling and mono mixing.
FORMATS = (("wav", 16000, 1), ("flac", 8000, 1), ("wav", 44100, 2), ("flac", 22050, 2))


def tone(freq: float, seconds: float, rate: int, rng: np.random.Generator, channels: int = 1) -> np.ndarray:
    """A tone with its second harmonic at a random phase and amplitude, plus noise; (frames, channels)."""
    t = np.arange(round(seconds * rate)) / rate
    phase = rng.uniform(0, 2 * np.pi)
    wave = np.sin(2 * np.pi * freq * t + phase) + 0.3 * np.sin(4 * np.pi * freq * t + phase)
    wave = rng.uniform(0.2, 0.6) * wave / 1.3 + rng.normal(0, 0.02, t.shape)
    return np.repeat(wave[:, None], channels, axis=1).clip(-1, 1)


def write_clip(path: Path, samples: np.ndarray, rate: int) -> None:
    """A 16-bit PCM wav or flac file (by suffix), as the keyword data source writes them."""
    import soundfile

    soundfile.write(path, samples, rate, subtype="PCM_16")


def write_audio_set(folder: Path, n_train: int, n_val: int, seed: int = 0) -> Path:
    """Clips under folder/clips and train.csv / validation.csv of (relative path, label), 0.5 to 1 s each."""
    rng = np.random.default_rng(seed)
    (folder / "clips").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("validation", n_val)):
        with open(folder / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["audio", "label"])
            for i in range(n):
                label = ("low", "high")[i % 2]
                suffix, rate, channels = FORMATS[(i // 2) % len(FORMATS)]
                name = f"clips/{split}-{i}.{suffix}"
                seconds = rng.uniform(0.5, 1.0)
                write_clip(folder / name, tone(TONES[label], seconds, rate, rng, channels), rate)
                w.writerow([name, label])
    return folder


@pytest.fixture(scope="module")
def audiodir(tmp_path_factory):
    d = tmp_path_factory.mktemp("audio")
    for family in ("wav2vec2", "hubert", "whisper"):
        save_tiny_pretrained(d / family, family)
    write_audio_set(d / "data", n_train=48, n_val=16)
    return d


def recipe(
    d: Path,
    family: str,
    name: str,
    train: str,
    strategies: str = "[freeze]",
    data: str = "",
    source: Path | None = None,
) -> Path:
    path = d / f"{name}.yaml"
    path.write_text(
        f"model: {{source: {d / family}, task: audio_classification}}\n"
        f"data: {{source: {source or d / 'data'}{', ' + data if data else ''}}}\n"
        f"strategies: {strategies}\n"
        f"train: {{{train}}}\n"
        f"output: {d / 'runs'}/{{name}}\n"
    )
    return path


def task_for(d: Path, host, family: str = "wav2vec2", source: Path | None = None, **data):
    """The registered task after setup, with its splits, files and the tiny model's feature extractor."""
    spec = DataSpec(source=str(source or d / "data"), **data)
    splits, files = load_data(spec, host, 0)
    task = host.lookup("tasks", "audio_classification").obj(spec)
    task.setup(splits, files)
    return task, splits, files, task.load_processor(str(d / family), {})


def peak_hz(samples: np.ndarray, rate: int) -> float:
    """The frequency of the largest magnitude in the spectrum."""
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[spectrum.argmax()])


# -- reading clips ---------------------------------------------------------------------------------


def test_a_44k_stereo_tone_decodes_to_16k_mono_at_its_frequency(audiodir, host, tmp_path):
    """Resampled with scipy to the extractor's rate, channels averaged; wav, flac, bytes, dicts and arrays agree."""
    import soundfile

    task, _, _, processor = task_for(audiodir, host)
    t = np.arange(44100) / 44100
    left, right = 0.6 * np.sin(2 * np.pi * 440 * t), 0.2 * np.sin(2 * np.pi * 440 * t)
    soundfile.write(tmp_path / "a440.wav", np.stack([left, right], axis=1), 44100, subtype="FLOAT")
    samples = task.read_audio(str(tmp_path / "a440.wav"), 0, "x", RATE)
    assert samples.dtype == np.float32 and samples.shape == (RATE,)
    assert peak_hz(samples, RATE) == pytest.approx(440, abs=1)
    # the mean of the channels: amplitude (0.6 + 0.2) / 2, away from the filter's edges
    assert np.abs(samples[1000:-1000]).max() == pytest.approx(0.4, abs=0.01)
    # 8 kHz flac up to 16 kHz; the file, its bytes and datasets' dicts give the same samples
    soundfile.write(tmp_path / "a440.flac", 0.5 * np.sin(2 * np.pi * 440 * np.arange(8000) / 8000), 8000)
    raw = (tmp_path / "a440.flac").read_bytes()
    decoded = [
        task.read_audio(v, 0, "x", RATE)
        for v in (
            str(tmp_path / "a440.flac"),
            raw,
            {"bytes": raw, "path": None},
            {"bytes": None, "path": str(tmp_path / "a440.flac")},
        )
    ]
    assert decoded[0].shape == (RATE,) and peak_hz(decoded[0], RATE) == pytest.approx(440, abs=1)
    for other in decoded[1:]:
        np.testing.assert_array_equal(other, decoded[0])
    # arrays: at their own rate, or the extractor's when they come bare; cut to ``cut`` samples
    array = 0.5 * np.sin(2 * np.pi * 440 * np.arange(8000) / 8000)
    as_dict = task.read_audio({"array": array, "sampling_rate": 8000}, 0, "x", RATE)
    np.testing.assert_allclose(as_dict, decoded[0], atol=1e-3)  # the flac file held 16-bit samples
    numpy_rate = task.read_audio({"array": array, "sampling_rate": np.int64(8000)}, 0, "x", RATE)
    np.testing.assert_array_equal(numpy_rate, as_dict)
    bare = task.read_audio(list(array), 0, "x", RATE, cut=4000)
    assert bare.shape == (4000,) and np.allclose(bare, array[:4000])
    cut = task.read_audio(str(tmp_path / "a440.wav"), 0, "x", RATE, cut=RATE // 2)
    np.testing.assert_allclose(cut, samples[: RATE // 2], atol=1e-4)  # only the frames needed were read


def test_every_column_kind_encodes_to_the_same_batch(audiodir, host):
    """Relative paths, file bytes, a datasets Audio column and decoded arrays: one batch, padded per batch."""
    import datasets
    import torch

    task, splits, files, processor = task_for(audiodir, host)
    rows = splits["validation"].to_list()[:6]
    paths = [str(audiodir / "data" / r["audio"]) for r in rows]
    labels = [r["label"] for r in rows]
    by_path = task.encode(splits["validation"].select(range(6)), processor, files["validation"])
    collate = task.collate(processor)
    expected = collate([by_path[i] for i in range(len(by_path))])
    clips = [task.read_audio(p, i, "x", RATE) for i, p in enumerate(paths)]
    longest = max(len(c) for c in clips)
    assert expected["input_values"].shape == (6, longest) and expected.keys() == {"input_values", "labels"}
    assert expected["labels"].tolist() == [task.ids[name] for name in labels]
    as_bytes = datasets.Dataset.from_dict({"audio": [Path(p).read_bytes() for p in paths], "label": labels})
    as_feature = datasets.Dataset.from_dict({"audio": paths, "label": labels}).cast_column(
        "audio", datasets.Audio()
    )
    as_arrays = datasets.Dataset.from_dict(
        {"audio": [{"array": c, "sampling_rate": RATE} for c in clips], "label": labels}
    )
    bare = datasets.Dataset.from_dict({"audio": [c.tolist() for c in clips], "label": labels})
    for ds in (as_bytes, as_feature, as_arrays, bare):
        encoded = task.encode(ds, processor, "other")
        got = collate([encoded[i] for i in range(len(encoded))])
        torch.testing.assert_close(got["input_values"], expected["input_values"], rtol=0, atol=1e-6)
    # each clip normalised alone (zero mean, unit variance), zero padding after it
    for i, clip in enumerate(clips):
        values, padding = expected["input_values"][i, : len(clip)], expected["input_values"][i, len(clip) :]
        assert abs(values.mean()) < 1e-3 and values.std() == pytest.approx(1, abs=1e-2)
        assert not padding.any()


def test_hubert_gets_attention_masks_and_max_seconds_cuts_and_pads(audiodir, host):
    """A layer-normed model's extractor makes masks; ``max_seconds`` gives every clip the same length."""
    task, splits, files, processor = task_for(audiodir, host, "hubert")
    assert processor.return_attention_mask
    part = splits["validation"].select(range(4))
    encoded = task.encode(part, processor, files["validation"])
    batch = task.collate(processor)([encoded[i] for i in range(4)])
    lengths = [len(task.read_audio(str(audiodir / "data" / a), 0, "x", RATE)) for a in part["audio"]]
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["input_values"].shape == (4, max(lengths))
    assert min(lengths) < 12000 < max(lengths)  # 0.75 s: some clips are cut, others padded
    task, splits, files, processor = task_for(audiodir, host, "hubert", max_seconds=0.75)
    encoded = task.encode(part, processor, files["validation"])
    batch = task.collate(processor)([encoded[i] for i in range(4)])
    assert batch["input_values"].shape == (4, 12000)
    assert batch["attention_mask"].sum(1).tolist() == [min(n, 12000) for n in lengths]


# -- bad rows --------------------------------------------------------------------------------------


def test_unreadable_clips_name_file_row_and_column(audiodir, host, tmp_path):
    import shutil

    import datasets

    data = tmp_path / "data"
    shutil.copytree(audiodir / "data", data)
    task, splits, files, processor = task_for(audiodir, host, source=data)
    broken, missing = (data / splits["train"][i]["audio"] for i in (3, 5))
    assert broken.suffix == ".flac" and missing.suffix == ".wav"
    broken.write_text("not audio")
    missing.unlink()
    with pytest.raises(DataError) as err:
        task.encode(splits["train"], processor, files["train"])
    msg = str(err.value)
    assert msg.startswith(
        f"{data / 'train.csv'}: row 4, column 'audio': cannot read the audio file {broken}: "
    )
    assert "LibsndfileError" in msg and "Format not recognised" in msg
    # with row 4 repaired, the missing file of row 6 is the first problem
    first = splits["train"][0]["audio"]
    repaired = splits["train"].map(lambda r, i: {"audio": first} if i == 3 else r, with_indices=True)
    with pytest.raises(
        DataError,
        match=rf"train.csv: row 6, column 'audio': cannot read the audio file {missing}: FileNotFoundError",
    ):
        task.encode(repaired, processor, files["train"])
    cases = {
        None: "expected a wav or flac file path, the file's bytes, .* got NoneType",
        3: "expected a wav or flac file path, .* got int 3",
        "": "expected a wav or flac file path, .* got str ''",
        b"RIFF....": "cannot read the audio bytes: LibsndfileError",
    }
    for value, words in cases.items():
        with pytest.raises(DataError, match=rf"^rows.jsonl: row 1, column 'audio': {words}"):
            task.encode(
                datasets.Dataset.from_dict({"audio": [value], "label": ["low"]}), processor, "rows.jsonl"
            )
    arrays = [
        ([[0.1, 0.2], [0.3, 0.4]], r"expected a non-empty 1-D \(mono\) array of samples, got shape \(2, 2\)"),
        ([], "expected a non-empty 1-D"),
        ([0.1, float("nan")], "the samples include NaN"),
    ]
    for value, words in arrays:
        with pytest.raises(DataError, match=rf"^rows.jsonl: row 1, column 'audio': {words}"):
            task.encode(
                datasets.Dataset.from_dict({"audio": [value], "label": ["low"]}), processor, "rows.jsonl"
            )
    with pytest.raises(
        DataError, match="row 1, column 'audio': 'sampling_rate' must be a positive whole number"
    ):
        task.encode(
            datasets.Dataset.from_dict(
                {"audio": [{"array": [0.1, 0.2], "sampling_rate": -8000}], "label": ["low"]}
            ),
            processor,
            "rows.jsonl",
        )


def test_a_clip_that_breaks_after_the_check_still_names_its_row(audiodir, host, tmp_path):
    """A file truncated between encoding and training fails when the batch is read, naming the row."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(audiodir / "data", data)
    task, splits, files, processor = task_for(audiodir, host, source=data)
    encoded = task.encode(splits["validation"], processor, files["validation"])
    target = data / splits["validation"][2]["audio"]
    target.write_bytes(target.read_bytes()[:20])  # a truncated header
    assert encoded[1]["labels"] in (0, 1)
    with pytest.raises(DataError, match=r"validation.csv: row 3, column 'audio': cannot read the audio file"):
        encoded[2]


def test_bad_rows_exit_2_with_one_message_through_the_cli(audiodir, capsys, tmp_path):
    """``adaptkit train`` on data with a missing clip: exit status 2, one message naming file, row and column."""
    from adaptkit.cli import main

    rows = [{"audio": str(audiodir / "data" / "clips" / f"train-{i}.wav"), "label": "low"} for i in (0, 1)]
    rows.append({"audio": "clips/nowhere.flac", "label": "high"})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "validation.jsonl").write_text(json.dumps(rows[0]) + "\n")
    path = recipe(audiodir, "wav2vec2", "bad", "max_steps: 1", source=tmp_path)
    code = main(["train", str(path), "--fresh"])
    err = capsys.readouterr().err
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("adaptkit: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith(
        f"adaptkit: error: {tmp_path / 'train.jsonl'}: row 3, column 'audio': cannot read the audio file "
        f"{tmp_path / 'clips' / 'nowhere.flac'}: FileNotFoundError"
    ), err


# -- Whisper's encoder, shortened --------------------------------------------------------------------


def test_whisper_keeps_the_first_positions_of_its_encoder(audiodir, host):
    """max_seconds 0.8: the first 50 positions (1 s: whole seconds), 100 mel frames, clips cut at 0.8 s."""
    import torch
    from transformers import AutoFeatureExtractor, AutoModelForAudioClassification

    from adaptkit_plugins.tasks.audio import fit_whisper

    task, splits, files, processor = task_for(audiodir, host, "whisper", max_seconds=0.8)
    model = AutoModelForAudioClassification.from_pretrained(audiodir / "whisper", **task.model_kwargs())
    full = model.encoder.embed_positions.weight
    assert full.shape[0] == 1500 and processor.n_samples == 30 * RATE
    task.prepare_model(model, processor)
    kept = model.encoder.embed_positions.weight
    assert kept.shape[0] == 50 and torch.equal(kept, full[:50]) and kept.requires_grad == full.requires_grad
    assert model.config.max_source_positions == 50 and model.encoder.config.max_source_positions == 50
    assert (processor.chunk_length, processor.n_samples, processor.nb_max_frames) == (1, RATE, 100)
    task.prepare_model(model, processor)  # again, as a resumed run does: nothing changes
    assert torch.equal(model.encoder.embed_positions.weight, full[:50])
    encoded = task.encode(splits["validation"].select(range(4)), processor, files["validation"])
    batch = task.collate(processor)([encoded[i] for i in range(4)])
    assert batch["input_features"].shape == (4, 80, 100) and batch.keys() == {"input_features", "labels"}
    # a clip longer than 0.8 s is cut there, then padded with silence to 1 s by the extractor
    paths = [str(audiodir / "data" / a) for a in splits["validation"]["audio"][:4]]
    clips = [task.read_audio(p, 0, "x", RATE) for p in paths]
    long = next(i for i, c in enumerate(clips) if len(c) > 0.85 * RATE)
    for i, clip in enumerate(clips):
        alone = processor(clip[:12800], sampling_rate=RATE)["input_features"][0]
        np.testing.assert_allclose(batch["input_features"][i].numpy(), alone, atol=1e-6)
    uncut = processor(clips[long], sampling_rate=RATE)["input_features"][0]
    assert not np.allclose(batch["input_features"][long].numpy(), uncut, atol=1e-3)
    with torch.no_grad():
        assert model(**batch).logits.shape == (4, 2)
    # the extractor saves and reloads at the shortened length (whole seconds: chunk_length stays an int)
    out = audiodir / "whisper-extractor"
    processor.save_pretrained(out)
    assert AutoFeatureExtractor.from_pretrained(out).n_samples == RATE
    with pytest.raises(
        ConfigError, match=r"data.max_seconds.*31 s is longer than this Whisper encoder reads \(1 s"
    ):
        fit_whisper(model, processor, 31)


# -- training through a recipe ---------------------------------------------------------------------

#: Each family's recipe data options: Whisper's encoder shortened to 1 s (0.5 to 1 s clips).
DATA = {"wav2vec2": "", "hubert": "", "whisper": "max_seconds: 1"}


def fresh_model(d: Path, family: str, host):
    """The base as a run loads it (a new head; Whisper's encoder shortened), to compare weights against."""
    from transformers import AutoModelForAudioClassification

    task, _, _, processor = task_for(d, host, family, max_seconds=1.0 if family == "whisper" else None)
    model = AutoModelForAudioClassification.from_pretrained(d / family, **task.model_kwargs())
    task.prepare_model(model, processor)
    return dict(model.named_parameters())


@pytest.mark.parametrize("family", ["wav2vec2", "hubert", "whisper"])
def test_freeze_probe_learns_tones_and_the_backbone_stays(audiodir, host, family):
    """The head alone trains through adaptkit.train: the loss falls; every backbone weight is bitwise unchanged."""
    import torch

    from adaptkit.runs import evaluate_run, open_run
    from adaptkit.train.loop import train

    def run(name: str, spec: str) -> dict:
        path = recipe(audiodir, family, f"{family}-{name}", spec, data=DATA[family])
        return train(load_recipe(path, host=host), host, fresh=True)

    untrained = run("untrained", "max_steps: 1, lr: 1.0e-12, micro_batch_size: 8")
    trained = run("probe", "epochs: 6, lr: 3.0e-2, micro_batch_size: 8, warmup_ratio: 0.1")
    before, after = untrained["final_metrics"], trained["final_metrics"]
    assert after["eval_loss"] < before["eval_loss"] - 0.1 and after["accuracy"] >= 0.75, (before, after)
    assert trained["steps"] == 6 * 6  # 48 training clips, 8 a batch, validation from its own file

    opened = open_run(audiodir / "runs" / f"{family}-probe", host)
    assert opened.adapted.model.config.id2label == {0: "high", 1: "low"}
    base = fresh_model(audiodir, family, host)
    head = {"projector.weight", "projector.bias", "classifier.weight", "classifier.bias"}
    params = dict(opened.adapted.model.named_parameters())
    assert params.keys() == base.keys()
    changed = {n for n, p in params.items() if not torch.equal(p, base[n])}
    assert changed == head, sorted(changed ^ head)
    # the saved final state on a freshly loaded (and for Whisper, shortened) base reproduces the run
    assert evaluate_run(opened)["accuracy"] == pytest.approx(after["accuracy"])
    assert accuracy_of_predict(opened, audiodir / "data", "audio") == pytest.approx(after["accuracy"])


def accuracy_of_predict(opened, data: Path, column: str) -> float:
    """``predict`` on the validation files by path: its labels score what evaluation scored."""
    from adaptkit.runs import predict

    with open(data / "validation.csv") as f:
        rows = list(csv.DictReader(f))
    got = predict(opened, [str(data / r[column]) for r in rows])
    assert [g["input"] for g in got] == [str(data / r[column]) for r in rows]
    assert all(0.5 <= g["score"] <= 1 for g in got)
    return sum(g["label"] == r["label"] for g, r in zip(got, rows)) / len(rows)


def test_lora_on_hubert_through_the_cli(audiodir, capsys):
    """``adaptkit train`` with LoRA on HuBERT (attention masks, variable lengths): the tones are learned."""
    from adaptkit.cli import main

    path = recipe(
        audiodir,
        "hubert",
        "hubert-lora",
        "epochs: 6, lr: 3.0e-3, micro_batch_size: 8",
        strategies="[{name: lora, r: 4}]",
    )
    code = main(["train", str(path), "--fresh"])
    assert code == 0, capsys.readouterr().err[-3000:]
    summary = json.loads((audiodir / "runs" / "hubert-lora" / "summary.json").read_text())
    final = summary["final_metrics"]
    assert final["eval_loss"] < 0.45 and final["accuracy"] >= 0.8, final  # from 0.69 and 0.5 untrained


def test_whisper_full_fine_tuning_resumes_and_exports_shortened(audiodir, host, tmp_path, capsys):
    """Full fine-tuning of a 1 s Whisper: its checkpoints resume bit for bit, and a merged export reloads
    with plain transformers as it trained (50 positions, an extractor of 1 s)."""
    import shutil

    import torch
    from transformers import AutoFeatureExtractor, AutoModelForAudioClassification

    from adaptkit.export import export
    from adaptkit.runs import open_run
    from adaptkit.train.loop import train

    spec = "max_steps: 6, lr: 1.0e-2, micro_batch_size: 8, save_every: 3"
    path = recipe(audiodir, "whisper", "whisper-full", spec, strategies="[full]", data=DATA["whisper"])
    first = train(load_recipe(path, host=host), host, fresh=True)
    assert first["final_metrics"]["accuracy"] >= 0.9, first["final_metrics"]
    run_dir = audiodir / "runs" / "whisper-full"
    (run_dir / "summary.json").unlink()
    shutil.rmtree(run_dir / "checkpoints" / "step-00000006")
    capsys.readouterr()
    resumed = train(load_recipe(path, host=host), host)
    assert "resuming from" in capsys.readouterr().err
    assert resumed["param_digest"] == first["param_digest"]

    opened = open_run(run_dir, host)
    out = export(opened, tmp_path / "merged", fmt="transformers")
    model = AutoModelForAudioClassification.from_pretrained(out).eval()
    extractor = AutoFeatureExtractor.from_pretrained(out)
    assert model.config.max_source_positions == 50 and extractor.n_samples == RATE
    clip = tone(TONES["low"], 0.7, RATE, np.random.default_rng(5))[:, 0].astype(np.float32)
    features = extractor(clip, sampling_rate=RATE, return_tensors="pt")["input_features"]
    assert features.shape == (1, 80, 100)
    with torch.no_grad():
        logits = model(input_features=features).logits
        expected = opened.adapted.model(input_features=features).logits
    torch.testing.assert_close(logits, expected)
    assert model.config.id2label[int(logits.argmax())] == "low"


def test_a_lora_adapter_of_a_shortened_whisper_loads_back_as_it_trained(audiodir, host, tmp_path):
    """The adapter export names the full-length base; loading it lets the task cut the encoder again."""
    import torch

    from adaptkit.export import export
    from adaptkit.export.loading import load_adapter
    from adaptkit.runs import open_run
    from adaptkit.train.loop import train

    spec = "max_steps: 2, lr: 1.0e-2, micro_batch_size: 8"
    path = recipe(
        audiodir, "whisper", "whisper-lora", spec, strategies="[{name: lora, r: 4}]", data=DATA["whisper"]
    )
    train(load_recipe(path, host=host), host, fresh=True)
    opened = open_run(audiodir / "runs" / "whisper-lora", host)
    loaded = load_adapter(export(opened, tmp_path / "adapter"), host)
    assert loaded.get_base_model().config.max_source_positions == 50
    clip = tone(TONES["high"], 0.7, RATE, np.random.default_rng(6))[:, 0].astype(np.float32)
    features = opened.processor(clip, sampling_rate=RATE, return_tensors="pt")["input_features"]
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_features=features).logits,
            opened.adapted.model.eval()(input_features=features).logits,
        )
