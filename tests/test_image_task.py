"""The ``image_classification`` task: images by path, bytes or decoded, a tiny ViT trained through a recipe."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from adaptkit.data.load import load_data
from adaptkit.errors import DataError
from adaptkit.recipe.schema import DataSpec, load_recipe
from adaptkit.testing import save_tiny_pretrained

SIZE = 24  # larger than the tiny ViT's 16x16 input: the processor must resize


def stripes(path: Path, vertical: bool, rng: np.random.Generator) -> None:
    """A noisy RGB image of bright stripes, two pixels wide, vertical or horizontal, at a random phase."""
    from PIL import Image

    line = (np.arange(SIZE) + rng.integers(0, 4)) // 2 % 2 == 0
    on = np.broadcast_to(line[None, :] if vertical else line[:, None], (SIZE, SIZE))
    pixels = np.where(on, 200, 40)[..., None] + rng.integers(-40, 41, (SIZE, SIZE, 3))
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)


def write_image_set(folder: Path, n_train: int, n_val: int, seed: int = 0) -> Path:
    """PNG files under folder/img and train.csv / validation.csv of (relative path, label name)."""
    rng = np.random.default_rng(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("validation", n_val)):
        with open(folder / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "label"])
            for i in range(n):
                vertical = i % 2 == 0
                name = f"img/{split}-{i}.png"
                stripes(folder / name, vertical, rng)
                w.writerow([name, "vertical" if vertical else "horizontal"])
    return folder


@pytest.fixture(scope="module")
def imagedir(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    save_tiny_pretrained(d / "vit", "vit")
    write_image_set(d / "data", n_train=96, n_val=32)
    return d


def recipe(
    d: Path, name: str, train: str, strategies: str = "[{name: freeze, trainable_top_blocks: 1}]"
) -> Path:
    path = d / f"{name}.yaml"
    path.write_text(
        f"model: {{source: {d / 'vit'}, task: image_classification}}\n"
        f"data: {{source: {d / 'data'}}}\n"
        f"strategies: {strategies}\n"
        f"train: {{{train}}}\n"
        f"output: {d / 'runs'}/{{name}}\n"
    )
    return path


def task_for(d: Path, host, source: Path | None = None):
    """The registered task after setup, with its splits, files and the tiny ViT's processor."""
    spec = DataSpec(source=str(source or d / "data"))
    splits, files = load_data(spec, host, 0)
    task = host.lookup("tasks", "image_classification").obj(spec)
    task.setup(splits, files)
    return task, splits, files, task.load_processor(str(d / "vit"), {})


def test_freeze_probe_learns_stripes_and_frozen_weights_stay(imagedir, host):
    """Head and top block train through adaptkit.train; accuracy beats the untrained model; the rest is bitwise frozen."""
    import torch
    from transformers import AutoModelForImageClassification

    from adaptkit.runs import evaluate_run, open_run
    from adaptkit.train.loop import train

    untrained = train(
        load_recipe(
            recipe(imagedir, "untrained", "max_steps: 1, lr: 1.0e-12, micro_batch_size: 16"), host=host
        ),
        host,
        fresh=True,
    )
    trained = train(
        load_recipe(recipe(imagedir, "probe", "epochs: 3, lr: 1.0e-2, micro_batch_size: 16"), host=host),
        host,
        fresh=True,
    )
    before, after = untrained["final_metrics"]["accuracy"], trained["final_metrics"]["accuracy"]
    assert after >= 0.9 and after >= before + 0.25, (before, after)
    assert {"accuracy", "macro_f1", "eval_loss"} <= trained["final_metrics"].keys()
    assert trained["steps"] == 3 * 6  # 96 training images, 16 a batch, validation from its own file

    opened = open_run(imagedir / "runs" / "probe", host)
    assert opened.adapted.model.config.id2label == {0: "horizontal", 1: "vertical"}
    # the backbone as the loader gives it (transformers may rename keys on disk: compare loaded models)
    base = dict(
        AutoModelForImageClassification.from_pretrained(imagedir / "vit", num_labels=2).named_parameters()
    )
    changed = {
        n
        for n, p in opened.adapted.model.named_parameters()
        if n.startswith("vit.") and not torch.equal(p, base[n])
    }
    top = {n for n in base if n.startswith("vit.layers.2.")}
    assert changed == top, sorted(changed ^ top)
    # the saved final state reproduces the run's metrics
    assert evaluate_run(opened)["accuracy"] == pytest.approx(after)
    # predict reads image files as validation does: its labels score the same
    from test_audio_task import accuracy_of_predict

    assert accuracy_of_predict(opened, imagedir / "data", "image") == pytest.approx(after)


def test_predict_names_an_unreadable_image_and_exits_2(imagedir, host, capsys, tmp_path):
    from adaptkit.cli import main
    from adaptkit.train.loop import train

    train(load_recipe(recipe(imagedir, "one-step", "max_steps: 1, micro_batch_size: 16"), host=host), host)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    good = str(imagedir / "data" / "img" / "validation-0.png")
    code = main(["predict", str(imagedir / "runs" / "one-step"), good, str(tmp_path / "broken.png")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "the command line: row 2, column 'image'" in err and "broken.png" in err, err


def test_paths_bytes_and_image_columns_give_the_same_pixels(imagedir, host):
    """A relative path, the file's bytes and a datasets Image column encode identically; grey becomes RGB."""
    import io

    import datasets
    import torch
    from PIL import Image

    task, splits, files, processor = task_for(imagedir, host)
    by_path = task.encode(splits["validation"], processor, files["validation"])
    rows = splits["validation"].to_list()
    raw = [(imagedir / "data" / r["image"]).read_bytes() for r in rows]
    as_bytes = datasets.Dataset.from_dict({"image": raw, "label": [r["label"] for r in rows]})
    as_feature = datasets.Dataset.from_dict(
        {"image": [str(imagedir / "data" / r["image"]) for r in rows], "label": [r["label"] for r in rows]}
    ).cast_column("image", datasets.Image())
    collate = task.collate(processor)
    expected = collate([by_path[i] for i in range(len(by_path))])
    assert expected["pixel_values"].shape == (len(rows), 3, 16, 16)
    assert expected["labels"].tolist() == [task.ids[r["label"]] for r in rows]
    for ds in (as_bytes, as_feature):
        encoded = task.encode(ds, processor, "other")
        got = collate([encoded[i] for i in range(len(encoded))])
        torch.testing.assert_close(got["pixel_values"], expected["pixel_values"], rtol=0, atol=0)
        assert torch.equal(got["labels"], expected["labels"])
    # the processor rescaled and normalised (mean 0.5, std 0.5): values in [-1, 1], not 0..255
    values = expected["pixel_values"]
    assert -1 - 1e-6 <= values.min() < 0 < values.max() <= 1 + 1e-6
    buffer = io.BytesIO()
    Image.open(io.BytesIO(raw[0])).convert("L").save(buffer, format="PNG")
    grey = task.encode(
        datasets.Dataset.from_dict({"image": [buffer.getvalue()], "label": ["vertical"]}), processor, "grey"
    )
    pixels = grey[0]["pixel_values"]
    assert (
        pixels.shape == (3, 16, 16)
        and torch.equal(pixels[0], pixels[1])
        and torch.equal(pixels[1], pixels[2])
    )


def test_unreadable_images_name_file_row_and_column(imagedir, host, tmp_path):
    import shutil

    import datasets

    data = tmp_path / "data"
    shutil.copytree(imagedir / "data", data)
    (data / "img" / "train-3.png").write_text("not an image")
    (data / "img" / "train-5.png").unlink()
    task, splits, files, processor = task_for(imagedir, host, source=data)
    with pytest.raises(DataError) as err:
        task.encode(splits["train"], processor, files["train"])
    msg = str(err.value)
    assert msg.startswith(f"{data / 'train.csv'}: row 4, column 'image': cannot read the image")
    assert "UnidentifiedImageError" in msg
    # with row 4 repaired, the missing file of row 6 is the first problem
    first = splits["train"][0]["image"]
    repaired = splits["train"].map(lambda r, i: {"image": first} if i == 3 else r, with_indices=True)
    with pytest.raises(
        DataError,
        match=r"train.csv: row 6, column 'image': cannot read the image: FileNotFoundError.*train-5.png",
    ):
        task.encode(repaired, processor, files["train"])
    with pytest.raises(
        DataError,
        match=r"rows.jsonl: row 1, column 'image': expected an image file path, image bytes or an image, got NoneType",
    ):
        task.encode(
            datasets.Dataset.from_dict({"image": [None], "label": ["vertical"]}), processor, "rows.jsonl"
        )


def test_an_image_that_breaks_after_the_check_still_names_its_row(imagedir, host, tmp_path):
    """A file truncated between encoding and training fails when the batch is read, naming the row."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(imagedir / "data", data)
    task, splits, files, processor = task_for(imagedir, host, source=data)
    encoded = task.encode(splits["validation"], processor, files["validation"])
    target = data / splits["validation"][2]["image"]
    target.write_bytes(target.read_bytes()[:60])  # the PNG header survives, the pixels do not
    assert encoded[1]["labels"] in (0, 1)
    with pytest.raises(DataError, match=r"validation.csv: row 3, column 'image': cannot read the image"):
        encoded[2]


def test_unknown_label_and_label_ids(imagedir, host, tmp_path):
    """Labels by name or by id, as in text classification; an unknown one names file, row and column."""
    (tmp_path / "img").symlink_to(imagedir / "data" / "img")
    rows = [{"image": f"img/train-{i}.png", "label": i % 2} for i in range(6)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task, splits, files, processor = task_for(imagedir, host, source=tmp_path / "train.jsonl")
    assert task.names == ["0", "1"]
    assert task.model_kwargs()["num_labels"] == 2 and task.model_kwargs()["ignore_mismatched_sizes"] is True
    encoded = task.encode(splits["train"], processor, files["train"])
    assert sorted(encoded[i]["labels"] for i in range(len(encoded))) == sorted(splits["train"]["label"])
    # validation was held out of train.jsonl: its relative paths resolve against that file's folder
    assert "held out" in files["validation"]
    task.encode(splits["validation"], processor, files["validation"])
    bad = splits["train"].map(lambda r, i: {"label": 7 if i == 2 else r["label"]}, with_indices=True)
    with pytest.raises(
        DataError, match=r"train.jsonl: row 3, column 'label': unknown label 7; the labels are \['0', '1'\]"
    ):
        task.encode(bad, processor, files["train"])


def test_auto_micro_batch_trial_steps_on_images(imagedir, host):
    """Images have no token lengths to sort by: the trial takes the first rows; the run equals a fixed-size one."""
    from adaptkit.train.loop import train

    auto = train(
        load_recipe(
            recipe(
                imagedir, "auto", "max_steps: 2, lr: 1.0e-2, micro_batch_size: auto, effective_batch_size: 8"
            ),
            host=host,
        ),
        host,
        fresh=True,
    )
    assert auto["memory_plan"]["tried"] == [8] and auto["micro_batch_size"] == 8
    fixed = train(
        load_recipe(recipe(imagedir, "fixed", "max_steps: 2, lr: 1.0e-2, micro_batch_size: 8"), host=host),
        host,
        fresh=True,
    )
    assert fixed["param_digest"] == auto["param_digest"]


def test_validation_rows_of_images_are_keyed_by_their_pixels(imagedir):
    """Each run digests its validation rows so a report can pair variants on the same examples:
    decoded images (and arrays) are keyed by content, the same in every load, never by address."""
    from PIL import Image

    from adaptkit.train.evaluate import example_keys

    with open(imagedir / "data" / "validation.csv") as f:
        listed = list(csv.DictReader(f))

    def rows(as_array: bool) -> list[dict]:
        images = [Image.open(imagedir / "data" / r["image"]).convert("RGB") for r in listed]
        return [
            {"image": np.asarray(im) if as_array else im, "label": r["label"]}
            for im, r in zip(images, listed)
        ]

    for as_array in (False, True):
        first, second = example_keys(rows(as_array)), example_keys(rows(as_array))
        assert first == second and len(set(first)) == len(listed)
