"""micro_batch_size: auto confirms the estimator's choice with trial steps (Accelerate's
find_executable_batch_size), stepping down on a real out-of-memory error.

On a CPU, running out of memory normally ends in the kernel's OOM killer, not an exception. A
process whose address space is capped (RLIMIT_AS) gets the real allocator error instead
("DefaultCPUAllocator: can't allocate memory"), which is what a GPU raises as "CUDA out of
memory": the tests cap a child process that way, after a warm-up run has mapped every library.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

VOCAB = 16000  # the logits (vocabulary x tokens) dominate a step's memory: 4 MB an example at 64 tokens (see CHILD)

CHILD = r"""
import resource, sys
import adaptkit.kernels.lm_loss
from adaptkit.cli import main

# the whole micro-batch in one chunk: the loss' logits buffer grows with the batch, 4 MB an example
adaptkit.kernels.lm_loss.CHUNK_BYTES["cpu"] = 2**40

warm, recipe, headroom = sys.argv[1], sys.argv[2], int(sys.argv[3])
assert main(["train", warm, "--fresh"]) == 0  # maps torch's kernels, the tokenizer's threads, malloc arenas
size = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + headroom * 2**20, resource.RLIM_INFINITY))
sys.exit(main(["train", recipe, "--fresh"]))
"""


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory):
    from adaptkit.testing import save_tiny_pretrained

    d = tmp_path_factory.mktemp("probe")
    save_tiny_pretrained(d / "llama", "llama", task="causal_lm", chat=True, vocab_size=VOCAB)
    rng = random.Random(0)
    words = "the a movie film good bad one two three".split()
    for name, n_words in (("short", 60), ("long", 600)):
        with open(d / f"{name}.jsonl", "w") as f:
            for i in range(32):
                f.write(
                    json.dumps(
                        {
                            "prompt": f"question {i}",
                            "response": " ".join(rng.choice(words) for _ in range(n_words)),
                        }
                    )
                    + "\n"
                )
    return d


def recipe(
    d: Path, name: str, strategies: str, train: str, data: str = "short", max_length: int = 64
) -> Path:
    path = d / f"{name}.yaml"
    path.write_text(
        f"name: {name}\n"
        f"model: {{source: {d / 'llama'}, task: causal_lm}}\n"
        f"data: {{source: {d / data}.jsonl, max_length: {max_length}}}\n"
        f"strategies: {strategies}\n"
        f"train: {{{train}}}\n"
        f"output: {d / 'runs'}/{{name}}\n"
    )
    return path


def capped_train(d: Path, path: Path, headroom_mb: int) -> subprocess.CompletedProcess:
    """``adaptkit train path`` in a child whose address space may grow by ``headroom_mb`` after a warm-up run."""
    warm = recipe(d, "warm", "[full]", "micro_batch_size: 1, max_steps: 1")
    # glibc returns freed blocks at once: the cap is hidden from the estimate, which would choose to
    # keep freed memory for reuse, and the heap that failed trials grew would then stay mapped under
    # the cap (adaptkit leaves a user's own glibc settings as they are). One malloc arena: the cap
    # counts address space, and each further arena a thread happens to open reserves 64 MiB of it
    # at a moment no trial step can foresee, so a size a trial passed could fail a step later
    release = {
        "MALLOC_MMAP_THRESHOLD_": "131072",
        "MALLOC_TRIM_THRESHOLD_": "131072",
        "MALLOC_ARENA_MAX": "1",
    }
    env = {**os.environ, "ADAPTKIT_DISABLE_PLUGIN_AUTOLOAD": "1", **release}
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(warm), str(path), str(headroom_mb)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


LORA = "[{name: lora, r: 4, dropout: 0.1}]"  # dropout: the trial steps draw random numbers that must be given back


def test_a_trial_step_out_of_memory_steps_down_and_training_is_unchanged(probe_dir, host):
    from adaptkit.recipe.schema import load_recipe
    from adaptkit.train.loop import train
    from adaptkit.train.memory import BATCH_FILE

    auto = recipe(
        probe_dir, "auto", LORA, "micro_batch_size: auto, effective_batch_size: 32, max_steps: 2, lr: 1.0e-2"
    )
    res = capped_train(probe_dir, auto, headroom_mb=200)
    assert res.returncode == 0, res.stderr[-3000:]
    # the estimator, seeing gigabytes free, picks all 32; the trial steps find what really fits
    assert "micro_batch_size auto: 32 x 1 accumulation steps" in res.stderr
    assert "a trial step with 32 ran out of memory; trying 16" in res.stderr
    run_dir = probe_dir / "runs" / "auto"
    summary = json.loads((run_dir / "summary.json").read_text())
    micro, accumulation = summary["micro_batch_size"], summary["gradient_accumulation"]
    assert micro < 32 and micro * accumulation == 32
    tried = summary["memory_plan"]["tried"]
    assert tried[0] == 32 and tried[-1] == micro and tried == sorted(tried, reverse=True)
    saved = json.loads((run_dir / BATCH_FILE).read_text())
    assert (saved["micro_batch_size"], saved["gradient_accumulation"], saved["tried"]) == (
        micro,
        accumulation,
        tried,
    )
    # the trial steps left no trace: the same weights as a run given that micro-batch outright
    fixed = recipe(
        probe_dir,
        "fixed",
        LORA,
        f"micro_batch_size: {micro}, gradient_accumulation: {accumulation}, max_steps: 2, lr: 1.0e-2",
    )
    outright = train(load_recipe(fixed, host=host), host, fresh=True)
    assert outright["param_digest"] == summary["param_digest"]


def test_not_even_one_example_fits(probe_dir):
    auto = recipe(
        probe_dir,
        "none-fits",
        "[full]",
        "micro_batch_size: auto, effective_batch_size: 4, max_steps: 1",
        data="long",
        max_length=1024,
    )
    res = capped_train(probe_dir, auto, headroom_mb=60)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "a trial step ran out of memory even with a micro-batch of 1 (tried 4, 2, 1)" in res.stderr
    assert "model.gradient_checkpointing=true" in res.stderr and "Traceback" not in res.stderr
    assert not (probe_dir / "runs" / "none-fits").exists()  # stopped before writing anything


def test_trial_steps_train_what_gradual_unfreezing_thaws_later(probe_dir, host):
    """The micro-batch must fit the last phase too; the blocks thawed for the trial are frozen again, unchanged."""
    import torch

    from adaptkit.recipe.schema import load_recipe
    from adaptkit.testing import load_recipe_model
    from adaptkit.train.loop import train

    strategies = "[{name: gradual_unfreeze, every: 1}]"  # the head first; a block per epoch after that
    train_spec = "micro_batch_size: {}, max_steps: 1, lr: 1.0e-2"
    auto = load_recipe(
        recipe(probe_dir, "gu-auto", strategies, train_spec.format("auto, effective_batch_size: 8")),
        host=host,
    )
    loaded = load_recipe_model(auto, host)
    blocks = loaded.model.model.layers
    before = {n: p.detach().clone() for n, p in blocks.named_parameters()}
    grads: dict[str, int] = {}
    for (
        n,
        p,
    ) in blocks.named_parameters():  # in step 1 the blocks are frozen: only a trial step gives them gradients
        p.register_post_accumulate_grad_hook(lambda p, n=n: grads.__setitem__(n, grads.get(n, 0) + 1))
    summary = train(auto, host, fresh=True, loaded_model=loaded)
    assert summary["memory_plan"]["tried"] == [8]
    assert grads == {n: 2 for n in before}  # two trial passes, every block
    assert all(not p.requires_grad and torch.equal(p, before[n]) for n, p in blocks.named_parameters())
    fixed = load_recipe(recipe(probe_dir, "gu-fixed", strategies, train_spec.format(8)), host=host)
    assert train(fixed, host, fresh=True)["param_digest"] == summary["param_digest"]


def test_a_resumed_run_does_not_try_again(probe_dir, host):
    from adaptkit.recipe.schema import load_recipe
    from adaptkit.train.loop import train

    spec = "micro_batch_size: auto, effective_batch_size: 16, max_steps: {}, save_every: 1"
    first = train(
        load_recipe(recipe(probe_dir, "resume", "[full]", spec.format(1)), host=host), host, fresh=True
    )
    assert first["memory_plan"]["tried"] == [16]
    # the loss takes the logits (16 x 64 tokens x 16,000 floats, 62.5 MiB) a 16 MiB chunk at a time: no block a
    # step makes is over glibc's 32 MiB mmap limit, and glibc's default stands
    assert "allocator" not in first["memory_plan"]
    resumed = train(load_recipe(recipe(probe_dir, "resume", "[full]", spec.format(2)), host=host), host)
    assert (
        resumed["steps"] == 2
        and resumed["memory_plan"].get("chosen_before")
        and "tried" not in resumed["memory_plan"]
    )


def test_trial_steps_with_qlora_and_a_paged_8bit_optimizer(probe_dir, host):
    """bitsandbytes' optimizer keeps its own state per parameter: the trial's must be dropped too."""
    from adaptkit.recipe.schema import load_recipe
    from adaptkit.train.loop import train

    strategies = "[{name: lora, r: 4, quantize: 4bit}]"
    train_spec = "micro_batch_size: {}, max_steps: 2, lr: 1.0e-2, optimizer: paged_adamw_8bit"
    auto = train(
        load_recipe(
            recipe(probe_dir, "q-auto", strategies, train_spec.format("auto, effective_batch_size: 4")),
            host=host,
        ),
        host,
        fresh=True,
    )
    assert auto["memory_plan"]["tried"] == [4]
    fixed = train(
        load_recipe(recipe(probe_dir, "q-fixed", strategies, train_spec.format(4)), host=host),
        host,
        fresh=True,
    )
    assert fixed["param_digest"] == auto["param_digest"]


def test_the_trial_batch_is_made_of_the_longest_examples():
    """Lengths come from Arrow, through the data set's own row order (a shuffle or select is respected)."""
    import datasets

    from adaptkit.train.batch_probe import _longest_first

    d = datasets.Dataset.from_dict({"input_ids": [[1] * n for n in (3, 9, 1, 9, 5)], "labels": [0] * 5})
    assert _longest_first(d, 3) == [1, 3, 4]  # ties keep row order
    assert _longest_first(d.select([4, 0, 2]), 2) == [0, 1]
    shuffled = d.shuffle(seed=0)
    assert [len(shuffled[i]["input_ids"]) for i in _longest_first(shuffled, 5)] == [9, 9, 5, 3, 1]
