"""Length-aware batching (``train.batching: by_length``): micro-batches of similar lengths in a
seeded random order.

Every example comes once an epoch; the order depends on the seed and the epoch alone, so a killed
and resumed run trains bitwise as an uninterrupted one; after Accelerate hands the micro-batches
to the ranks, each rank's micro-batch still comes from one length bucket; the default
(``random``) is the permutation adaptkit always drew. The rows are encoded by the real causal-LM
task with a real tokenizer, and batched by the task's own collate function.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from adaptkit.data.load import load_data
from adaptkit.errors import ConfigError
from adaptkit.recipe.schema import DataSpec, TrainSpec, load_recipe
from adaptkit.testing import plugin_host, save_tiny_pretrained
from adaptkit.testing.kit import adaptkit_command
from adaptkit.train.sampling import (
    EpochSampler,
    LengthGroupedSampler,
    make_sampler,
)
from adaptkit.train.setup import make_loaders

ROWS = 400
WORDS = "the a movie film story plot actor scene good bad".split()


def write_rows(path: Path, n: int, longest: int = 60) -> None:
    """Prompt/response rows whose prompts have 1 to ``longest`` words: lengths vary tenfold."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            prompt = " ".join(rng.choices(WORDS, k=rng.randint(1, longest)))
            response = " ".join(rng.choices(WORDS, k=rng.randint(1, 6)))
            f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("length_batching")
    save_tiny_pretrained(d / "llama", "llama", "causal_lm")
    (d / "data").mkdir()
    write_rows(d / "data" / "train.jsonl", ROWS)
    write_rows(d / "data" / "validation.jsonl", 16)
    return d


@pytest.fixture(scope="module")
def encoded(work):
    """(the encoded training rows, the task's collate function), as a run encodes and batches them."""
    host = plugin_host()
    spec = DataSpec(source=str(work / "data"), max_length=128)
    splits, files = load_data(spec, host, 0)
    task = host.lookup("tasks", "causal_lm").obj(spec)
    task.setup(splits, files)
    processor = task.load_processor(str(work / "llama"), {})
    return task.encode(splits["train"], processor, files["train"]), task.collate(processor)


def lengths_of(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(1, 300) for _ in range(n)]


def epoch(sampler: EpochSampler, e: int) -> list[int]:
    sampler.set_epoch(e)
    return list(sampler)


# -- the order ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, micro, processes",
    [(0, 4, 1), (1, 4, 1), (7, 4, 2), (97, 8, 2), (1000, 8, 1), (1003, 3, 4)],
)
def test_every_example_comes_exactly_once_an_epoch(n, micro, processes):
    sampler = LengthGroupedSampler(lengths_of(n), seed=5, micro_batch_size=micro, processes=processes)
    assert len(sampler) == n
    for e in range(3):
        assert sorted(epoch(sampler, e)) == list(range(n))


def test_the_order_depends_on_seed_and_epoch_alone():
    lengths = lengths_of(500)

    def fresh(seed: int) -> LengthGroupedSampler:
        return LengthGroupedSampler(lengths, seed=seed, micro_batch_size=8, processes=2)

    first = [epoch(fresh(3), e) for e in range(3)]
    # a fresh sampler (a resumed process) set to the same epoch gives the same order, in any order of epochs
    assert [epoch(fresh(3), e) for e in (2, 0, 1)] == [first[2], first[0], first[1]]
    assert len({tuple(o) for o in first}) == 3  # a new order every epoch
    assert epoch(fresh(4), 0) != first[0]  # and for every seed


def test_each_micro_batch_is_one_length_bucket_and_the_batches_come_in_a_random_order():
    lengths = lengths_of(2000)
    order = epoch(LengthGroupedSampler(lengths, seed=0, micro_batch_size=8), 0)
    batches = [[lengths[i] for i in order[k : k + 8]] for k in range(0, len(order), 8)]
    # each a slice of one mega-batch sorted longest first; transformers swaps the longest example
    # of all into the first mega-batch's first place, which leaves one batch with one stray
    assert sum(b != sorted(b, reverse=True) for b in batches) <= 1
    firsts = [b[0] for b in batches]
    # not one long sorted run: the batches' order is shuffled (a sorted list has no ascents)
    ascents = sum(a < b for a, b in zip(firsts, firsts[1:]))
    assert ascents > len(batches) // 4, ascents


def test_the_default_random_order_is_the_seeded_permutation_adaptkit_always_drew(encoded):
    train_ds, _ = encoded
    spec = TrainSpec(seed=7)
    assert spec.batching == "random"
    sampler = make_sampler(train_ds, spec, processes=2)
    assert type(sampler) is EpochSampler
    for e in range(3):
        g = torch.Generator().manual_seed(7 + e)
        assert epoch(sampler, e) == torch.randperm(len(train_ds), generator=g).tolist()


# -- padding, and Accelerate's split across ranks ------------------------------------------------


def padding_fraction(train_ds, collate, batching: str, micro: int = 8) -> tuple[float, int]:
    """The fraction of padded positions over one epoch's batches, and the real tokens they hold."""
    sampler = make_sampler(train_ds, TrainSpec(batching=batching, micro_batch_size=micro), processes=1)
    loader, _ = make_loaders(train_ds, train_ds, sampler, collate, micro, seed=0)
    real = total = 0
    for batch in loader:
        real += int(batch["attention_mask"].sum())
        total += batch["attention_mask"].numel()
    return 1 - real / total, real


def test_by_length_pads_far_less_than_random_on_mixed_lengths(encoded):
    train_ds, collate = encoded
    lengths = [len(ids) for ids in train_ds["input_ids"]]
    assert max(lengths) >= 4 * min(lengths)  # the data really mixes lengths
    random_pad, random_tokens = padding_fraction(train_ds, collate, "random")
    grouped_pad, grouped_tokens = padding_fraction(train_ds, collate, "by_length")
    assert grouped_tokens == random_tokens == sum(lengths)  # the same tokens, each once
    # the margin is measured here: random pads a good part of its batches, by_length a sliver
    assert random_pad > 0.2, random_pad
    assert grouped_pad < random_pad / 4, (grouped_pad, random_pad)


def rank_batches(sampler: EpochSampler, micro: int, processes: int) -> list[list[list[int]]]:
    """Each rank's micro-batches of indices, as Accelerate's own ``prepare_data_loader`` splits them."""
    from accelerate.data_loader import prepare_data_loader

    loader = torch.utils.data.DataLoader(list(range(len(sampler))), batch_size=micro, sampler=sampler)
    return [
        [b.tolist() for b in prepare_data_loader(loader, num_processes=processes, process_index=r)]
        for r in range(processes)
    ]


def padding(ranks: list[list[list[int]]], lengths: list[int]) -> int:
    """The padded positions of every rank's micro-batches, each padded to its longest row."""
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for r in ranks for b in r)


@pytest.mark.parametrize("processes", [2, 3])
def test_after_accelerates_split_each_ranks_micro_batch_is_one_length_bucket(processes):
    """A step's micro-batches, one a rank, are consecutive slices of one sorted mega-batch."""
    n, micro = 1001, 4  # a partial last step, which Accelerate completes from the epoch's start
    lengths = lengths_of(n, seed=1)
    ranks = rank_batches(LengthGroupedSampler(lengths, 0, micro, processes), micro, processes)
    steps = list(zip(*ranks))
    whole = n // (micro * processes)
    # rank 0's all >= rank 1's ... each sorted (but the one step holding transformers' swap)
    unsorted = [
        step
        for step in steps[:whole]
        if (step_lengths := [lengths[i] for batch in step for i in batch])
        != sorted(step_lengths, reverse=True)
    ]
    assert len(unsorted) <= 1
    seen = [i for step in steps[:whole] for batch in step for i in batch]
    assert len(seen) == len(set(seen)) == whole * micro * processes
    # so the ranks pad far less than in random order
    pad = padding(ranks, lengths)
    pad_random = padding(rank_batches(EpochSampler(n, 0), micro, processes), lengths)
    assert pad < pad_random / 4, (pad, pad_random)


# -- refusals ---------------------------------------------------------------------------------------


def lm_recipe(work: Path, name: str, data: str = "", train: str = "", strategies: str = "[full]") -> Path:
    path = work / f"{name}.yaml"
    path.write_text(
        f"model: {{source: {work / 'llama'}, task: causal_lm}}\n"
        f"data: {{source: {work / 'data'}, max_length: 64{data}}}\n"
        f"strategies: {strategies}\n"
        f"train: {{{train}}}\n"
        f"output: {work / 'runs'}/{{name}}\n"
    )
    return path


def test_the_recipe_names_the_two_batchings_and_refuses_others(work, capsys):
    from adaptkit.cli import main

    host = plugin_host()
    assert load_recipe(lm_recipe(work, "ok", train="batching: by_length"), host=host).train.batching == (
        "by_length"
    )
    assert main(["validate", str(lm_recipe(work, "bad", train="batching: sorted"))]) == 2
    err = capsys.readouterr().err
    assert "train.batching" in err and "by_length" in err


def test_by_length_with_packing_is_refused_when_the_recipe_is_validated(tmp_path, capsys):
    from adaptkit.cli import main

    save_tiny_pretrained(tmp_path / "llama", "llama", "causal_lm")
    (tmp_path / "data").mkdir()
    write_rows(tmp_path / "data" / "train.jsonl", 16)
    path = lm_recipe(tmp_path, "packed", data=", packing: true", train="batching: by_length")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "train.batching: by_length needs unpacked rows" in err, err[-2000:]
    assert "(got" not in err


def test_by_length_on_images_is_refused_naming_the_field(tmp_path):
    """Encoded images have no token ids to sort by."""
    import numpy as np
    from PIL import Image

    save_tiny_pretrained(tmp_path / "vit", "vit")
    (tmp_path / "data").mkdir()
    lines = ["image,label"]
    for i in range(4):
        Image.fromarray(np.full((16, 16, 3), 40 * i, dtype=np.uint8)).save(tmp_path / "data" / f"{i}.png")
        lines.append(f"{tmp_path / 'data' / f'{i}.png'},{['a', 'b'][i % 2]}")
    (tmp_path / "data" / "train.csv").write_text("\n".join(lines) + "\n")
    host = plugin_host()
    spec = DataSpec(source=str(tmp_path / "data" / "train.csv"))
    splits, files = load_data(spec, host, 0)
    task = host.lookup("tasks", "image_classification").obj(spec)
    task.setup(splits, files)
    images = task.encode(splits["train"], task.load_processor(str(tmp_path / "vit"), {}), files["train"])
    assert make_sampler(images, TrainSpec(), processes=1).n == len(images)  # random is fine
    with pytest.raises(ConfigError) as exc:
        make_sampler(images, TrainSpec(batching="by_length"), processes=1)
    assert exc.value.problems[0][0] == "train.batching" and "input_ids" in str(exc.value)


# -- resume ----------------------------------------------------------------------------------------

KILLER = """
import os, signal
from adaptkit import hookimpl


@hookimpl
def adaptkit_on_step_end(run, step, logs):
    if step == int(os.environ["KILL_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)
"""

# 48 rows, micro-batches of 4, 2 accumulated: 6 steps an epoch on one process, 3 on two. Killed
# at the second epoch's first step, resumed from a checkpoint in the middle of the first: the
# resumed run skips the micro-batches it had trained, then crosses the epoch boundary.
RESUME = {1: (7, 4, 4), 2: (4, 2, 2)}  # processes: (kill at, resumed from, save every)


@pytest.mark.slow
# two processes only: each rank resumes as one process does, and the split between ranks is what
# one process cannot show
@pytest.mark.parametrize("processes", [pytest.param(2, marks=pytest.mark.distributed)], ids=["ddp-gloo"])
def test_a_by_length_run_killed_and_resumed_gives_the_uninterrupted_weights(tmp_path, processes):
    save_tiny_pretrained(tmp_path / "llama", "llama", "causal_lm")
    (tmp_path / "data").mkdir()
    write_rows(tmp_path / "data" / "train.jsonl", 48)
    write_rows(tmp_path / "data" / "validation.jsonl", 8)
    (tmp_path / "killer.py").write_text(KILLER)
    env = {**os.environ, "ADAPTKIT_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONPATH": str(tmp_path)}
    env["OMP_NUM_THREADS"] = "1"
    kill_at, resumed_from, save_every = RESUME[processes]

    def launch(name: str, batching: str, plugins: list[str], fresh: bool, **extra: str):
        train = (
            f"epochs: 2, micro_batch_size: 4, gradient_accumulation: 2, lr: 1.0e-3, "
            f"save_every: {save_every}, seed: 3, batching: {batching}"
        )
        path = lm_recipe(tmp_path, name, train=train, strategies="[{name: lora, r: 4}]")
        cmd = adaptkit_command([*plugins, "train", str(path), *(["--fresh"] if fresh else [])], processes)
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**env, **extra})
        summary = tmp_path / "runs" / name / "summary.json"
        return res, json.loads(summary.read_text()) if summary.exists() else None

    straight, expected = launch("straight", "by_length", [], True)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert expected["steps"] == 12 // processes
    killed, _ = launch("killed", "by_length", ["-p", "killer"], True, KILL_AT_STEP=str(kill_at))
    assert killed.returncode != 0
    if processes == 1:
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed, got = launch("killed", "by_length", [], False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"(step {resumed_from})" in resumed.stderr
    assert (got["steps"], got["epochs_completed"]) == (expected["steps"], expected["epochs_completed"])
    assert got["param_digest"] == expected["param_digest"]  # bitwise the uninterrupted weights
    if processes == 2:
        assert got["ranks_in_sync"] is True
    # by_length did change the order: the same run in random order ends elsewhere
    plain, other = launch("random", "random", [], True)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert other["param_digest"] != expected["param_digest"]
