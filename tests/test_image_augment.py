"""``image_augment``: a seeded, per-example augmentation of training images, applied as a transform."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image
from test_image_task import stripes

from adaptkit.errors import DataError
from adaptkit_plugins.transforms.images import image_augment


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture
def photo(tmp_path) -> Image.Image:
    stripes(tmp_path / "s.png", True, np.random.default_rng(0))
    return Image.open(tmp_path / "s.png").convert("RGB")


def test_the_same_seed_and_index_give_the_same_image_and_others_differ(photo):
    augment = image_augment(seed=3)
    first = augment({"image": photo, "label": "v"}, 7)
    assert first["label"] == "v" and first["image"].size == photo.size and first["image"].mode == "RGB"
    assert np.array_equal(pixels(first["image"]), pixels(augment({"image": photo}, 7)["image"]))
    assert not np.array_equal(pixels(first["image"]), pixels(augment({"image": photo}, 8)["image"]))
    assert not np.array_equal(
        pixels(first["image"]), pixels(image_augment(seed=4)({"image": photo}, 7)["image"])
    )
    assert not np.array_equal(pixels(first["image"]), pixels(photo))


def test_with_every_change_turned_off_the_image_is_unchanged(photo):
    off = image_augment(crop=1.0, rotate=0.0, shift=0.0, light=0.0)
    assert np.array_equal(pixels(off({"image": photo}, 0)["image"]), pixels(photo))


def test_flip_mirrors_only_when_asked(photo):
    flipped = image_augment(crop=1.0, rotate=0.0, shift=0.0, light=0.0, flip=True)
    outs = [pixels(flipped({"image": photo}, i)["image"]) for i in range(8)]
    mirrored = pixels(photo)[:, ::-1]
    assert any(np.array_equal(o, mirrored) for o in outs) and any(
        np.array_equal(o, pixels(photo)) for o in outs
    )


def test_bad_options_and_values_are_refused_naming_what(photo):
    with pytest.raises(ValueError, match="crop"):
        image_augment(crop=0)
    with pytest.raises(DataError, match="column 'image' holds int"):
        image_augment()({"image": 3}, 0)
    with pytest.raises(DataError, match="no column 'img'"):
        image_augment(column="img")({"image": photo}, 0)


def test_a_recipe_trains_on_augmented_images_and_names_a_relative_path_it_cannot_read(tmp_path, host, capsys):
    from adaptkit.cli import main
    from adaptkit.testing import save_tiny_pretrained

    save_tiny_pretrained(tmp_path / "vit", "vit")
    rng = np.random.default_rng(0)
    for absolute in (True, False):
        folder = tmp_path / f"data-{absolute}"
        folder.mkdir()
        for split in ("train", "validation"):
            with open(folder / f"{split}.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["image", "label"])
                for i in range(8):
                    stripes(folder / f"{split}-{i}.png", i % 2 == 0, rng)
                    name = folder / f"{split}-{i}.png" if absolute else f"{split}-{i}.png"
                    w.writerow([name, "vertical" if i % 2 == 0 else "horizontal"])
        path = tmp_path / f"r-{absolute}.yaml"
        path.write_text(
            f"model: {{source: {tmp_path / 'vit'}, task: image_classification}}\n"
            f"data: {{source: {folder}, transforms: [{{name: image_augment, rotate: 15}}]}}\n"
            "strategies: [full]\ntrain: {max_steps: 2, micro_batch_size: 4, preflight: false}\n"
            f"output: {tmp_path / 'runs'}/{{name}}\n"
        )
        code = main(["train", str(path)])
        err = capsys.readouterr().err
        if absolute:
            assert code == 0, err
            assert (tmp_path / "runs" / path.stem / "summary.json").is_file()
        else:
            assert code == 2 and "Traceback" not in err
            assert "data.transforms[0] (image_augment): column 'image': no image at 'train-0.png'" in err
