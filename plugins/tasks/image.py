"""Image classification: images from file paths, bytes or decoded images, labelled like text classification."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adaptkit.errors import DataError

from .classification import LabelledFiles

#: The column that carries each row's position, for error messages raised while training reads it.
_ROW = "__adaptkit_row__"


class ImageClassification(LabelledFiles):
    """Image classification: an image column (a file path, image bytes or an image) and a label.

    Relative paths are resolved against the data file's folder. The image processor comes with the
    model. Every image is checked when the data is encoded; pixels are decoded batch by batch as
    training reads them, so a large image set never sits in memory as tensors.
    """

    auto_model = "AutoModelForImageClassification"
    column_field = "image"

    def setup(self, splits, files):
        """Check the columns (``LabelledFiles.setup``); images read in RGB until the model says otherwise."""
        super().setup(splits, files)
        self.mode = "RGB"

    def load_processor(self, path, common):
        """The model's image processor (the PIL-based one when torchvision is missing)."""
        import transformers
        from transformers.utils import is_torchvision_available

        options = dict(common)
        if not is_torchvision_available():
            # the fast processors need torchvision: ask for the PIL-based one (transformers 5: backend=, before: use_fast=)
            legacy = int(transformers.__version__.split(".")[0]) < 5
            options.update({"use_fast": False} if legacy else {"backend": "pil"})
        return transformers.AutoImageProcessor.from_pretrained(path, **options)

    def prepare_model(self, model, processor):
        """Read images in greyscale for one-channel models, in RGB otherwise."""
        self.mode = "L" if getattr(model.config, "num_channels", 3) == 1 else "RGB"

    def open_image(self, value: Any, row: int, file: str, decode: bool = True) -> Any:
        """The image of one row in the model's colour mode (``decode=False``: only read its header).

        A missing or unreadable image is a DataError naming the file, row and column.
        """
        import io

        from PIL import Image

        where = f"{file}: row {row + 1}, column '{self.data.image}'"
        if isinstance(value, dict):  # datasets' undecoded Image feature: {"bytes": ..., "path": ...}
            value = value.get("bytes") or value.get("path")
        try:
            if isinstance(value, Image.Image):
                image = value
            elif isinstance(value, (bytes, bytearray)):
                image = Image.open(io.BytesIO(value))
            elif isinstance(value, str) and value:
                image = Image.open(self.folders.get(file, Path.cwd()) / value)
            else:
                raise DataError(
                    f"{where}: expected an image file path, image bytes or an image, got {type(value).__name__} {str(value)[:60]!r}"
                )
            if not decode:
                return image
            image.load()
            return image.convert(self.mode)
        except (
            OSError,
            ValueError,
            SyntaxError,
        ) as exc:  # PIL's errors for missing, truncated or non-image files
            raise DataError(f"{where}: cannot read the image: {type(exc).__name__}: {exc}") from None

    def encode(self, split, processor, file):
        """The image and label columns, every row checked now; pixels are decoded as training reads each batch."""
        import datasets

        col, label = self.data.image, self.data.label
        if isinstance(split.features.get(col), datasets.Image):
            split = split.cast_column(col, datasets.Image(decode=False))  # decoded below, a batch at a time
        split = split.select_columns([col, label]).add_column(_ROW, list(range(len(split))))
        for row, (value, name) in enumerate(
            zip(split[col], split[label])
        ):  # fail before training, naming the row
            self._label_id(name, row, file)
            self.open_image(value, row, file, decode=False)

        def transform(batch):
            rows = batch[_ROW]
            images = [self.open_image(v, r, file) for v, r in zip(batch[col], rows)]
            return {
                "pixel_values": processor(images, return_tensors="pt")["pixel_values"],
                "labels": [self._label_id(v, r, file) for v, r in zip(batch[label], rows)],
            }

        return split.with_transform(transform)

    def collate(self, processor):
        """A collate function stacking pixel values and labels into tensors."""

        def collate(rows):
            import torch

            return {
                "pixel_values": torch.stack([r["pixel_values"] for r in rows]),
                "labels": torch.tensor([r["labels"] for r in rows], dtype=torch.long),
            }

        return collate
