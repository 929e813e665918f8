"""Image augmentation as a training-data transform (``image_augment``), with PIL only.

Each training image is replaced, once, by a randomly cropped, turned, shifted and re-lit copy.
As with every transform, the randomness comes from the transform's seed and the example's index
alone, so a resumed run and every variant of a comparison train on the same images.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from typing import Any

from adaptkit.errors import DataError


def _image(value: Any, column: str) -> Any:
    """The PIL image a column holds: an image, image bytes, datasets' ``{"bytes", "path"}``, or a path."""
    from PIL import Image

    if isinstance(value, dict):  # datasets' undecoded Image feature
        value = value.get("bytes") or value.get("path")
    try:
        if isinstance(value, Image.Image):
            return value
        if isinstance(value, (bytes, bytearray)):
            return Image.open(io.BytesIO(value))
        if isinstance(value, str) and value:
            return Image.open(value)
    except FileNotFoundError:
        raise DataError(
            f"column {column!r}: no image at {value!r}; image_augment reads images held in the data "
            "(an Image column, as image folders and the packaged sets give them) or absolute paths"
        ) from None
    except OSError as exc:
        raise DataError(f"column {column!r}: cannot read the image: {exc}") from None
    raise DataError(f"column {column!r} holds {type(value).__name__}, not an image, image bytes or a path")


def image_augment(
    crop: float = 0.8,
    rotate: float = 10.0,
    shift: float = 0.1,
    flip: bool = False,
    light: float = 0.2,
    column: str = "image",
    seed: int = 0,
) -> Callable[[dict[str, Any], int], dict[str, Any]]:
    """Crop to a random ``crop``..1 of each side and resize back, turn by up to ``rotate`` degrees,
    shift by up to ``shift`` of the size, mirror left-right when ``flip`` (not for digits or text),
    and scale brightness and contrast by 1 +- ``light``."""
    if not 0 < crop <= 1:
        raise ValueError(f"crop must be above 0 and at most 1, got {crop!r}")
    if not 0 <= shift < 0.5 or not 0 <= light < 1 or not 0 <= rotate <= 180:
        raise ValueError("shift must be in [0, 0.5), light in [0, 1) and rotate in [0, 180]")

    def augment(example: dict[str, Any], index: int) -> dict[str, Any]:
        from PIL import ImageEnhance

        if column not in example:
            raise DataError(f"no column {column!r}; the columns are {sorted(example)} (set 'column')")
        image = _image(example[column], column)
        image.load()
        rng = random.Random(
            f"image_augment:{seed}:{index}"
        )  # (seed, index) alone: order and process do not matter
        w, h = image.size
        cw, ch = max(1, round(w * rng.uniform(crop, 1))), max(1, round(h * rng.uniform(crop, 1)))
        left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
        image = image.crop((left, top, left + cw, top + ch)).resize((w, h))
        dx, dy = round(rng.uniform(-shift, shift) * w), round(rng.uniform(-shift, shift) * h)
        image = image.rotate(rng.uniform(-rotate, rotate), translate=(dx, dy))
        if flip and rng.random() < 0.5:
            image = image.transpose(0)  # Image.Transpose.FLIP_LEFT_RIGHT
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast):
            image = enhance(image).enhance(rng.uniform(1 - light, 1 + light))
        return {**example, column: image}

    return augment
