"""adaptkit against TRL's SFTTrainer on the same chat data: LoRA on SmolLM2-135M, measured in one run.

The protocol is fixed before running. Four loops, each run in its own process:

- ``trl``: TRL's ``SFTTrainer`` with peft, packing off (batches padded to their longest row);
- ``trl-packed``: the same with ``packing=True`` and TRL's default strategy (best-fit decreasing,
  padding-free: the batch flattened into one row with restarting position ids);
- ``adaptkit``: ``adaptkit train``'s loop, packing off;
- ``adaptkit-packed``: the same with ``data.packing: true``.

Every loop trains the same rows, tokenized once by adaptkit's ``causal_lm`` task (chat template,
labels -100 outside the assistant's answer), so token ids and loss masking are identical: TRL
gets them pre-tokenized (``input_ids`` and ``labels`` columns). The rows are reasoning-gym
problems of six kinds, from a one-digit answer to a sorted word list, so lengths vary. Same
model (float32), LoRA (r 8, alpha 16, no dropout, the seven linear layers of every block),
AdamW at a constant 1e-4 without weight decay, micro-batch 8 rows of at most 256 tokens, seed 0,
and the same policy for freed memory (the one adaptkit chooses, given to TRL's process as glibc
environment variables). Each run trains ``--warmup`` untimed steps and ``--steps`` timed ones.

Throughput is supervised tokens per second: the tokens whose next token is a label (not -100),
counted inside each training step on the batch the model trained on, over the timed steps.
``--repeats`` rounds (5 by default), the four loops in an order drawn at random each round
(seeded by ``--order-seed``). It prints the median (min-max) of supervised tokens per second, peak
resident memory and the last step's loss for each loop, and the ratios of medians. Every run's
raw result goes, one JSON line each, to ``benchmarks/results/vs_trl-<date and time>.jsonl``.

    pip install trl   # not a dependency of adaptkit
    python benchmarks/vs_trl.py [--repeats 5] [--steps 5] [--warmup 1]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import LLAMA_LINEAR, machine, median, model_path, stamp  # noqa: E402

LOOPS = ("trl", "trl-packed", "adaptkit", "adaptkit-packed")
MODEL = "smollm2-135m-instruct"
TASKS = (
    "chain_sum",
    "basic_arithmetic",
    "spell_backward",
    "letter_counting",
    "caesar_cipher",
    "word_sorting",
)
ROWS_PER_TASK = 400
MAX_LENGTH, BATCH, LR, RANK, ALPHA = 256, 8, 1e-4, 8, 16


def write_rows(path: Path) -> None:
    """The training rows (prompt, response) of every task, shuffled with seed 0."""
    import reasoning_gym

    rows = []
    for task in TASKS:
        for entry in reasoning_gym.create_dataset(task, size=ROWS_PER_TASK, seed=0):
            rows.append({"prompt": entry["question"], "response": str(entry["answer"])})
    random.Random(0).shuffle(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def recipe(data: Path, model: str, packing: bool, steps: int, out: Path) -> dict:
    """The adaptkit recipe of the ``adaptkit`` loops."""
    return {
        "name": "vs-trl",
        "model": {"source": model, "task": "causal_lm"},
        "data": {
            "source": str(data),
            "prompt": "prompt",
            "response": "response",
            "max_length": MAX_LENGTH,
            "packing": packing,
            "max_eval_examples": 8,
        },
        "strategies": [{"name": "lora", "r": RANK, "alpha": ALPHA, "target_modules": LLAMA_LINEAR}],
        "train": {
            "max_steps": steps,
            "micro_batch_size": BATCH,
            "lr": LR,
            "scheduler": "constant",
            "warmup_ratio": 0.0,
            "weight_decay": 0.0,
            "seed": 0,
            "log_every": 1000,
        },
        "output": str(out / "{name}"),
    }


def run_adaptkit(data: Path, model: str, packing: bool, steps: int, tmp: Path) -> dict:
    """adaptkit's loop; supervised tokens counted where the loop weights each micro-batch by them."""
    import _steptimes

    from adaptkit.host.manager import get_plugin_host
    from adaptkit.recipe.schema import validate
    from adaptkit.train.loop import train
    from adaptkit_plugins.tasks.causal_lm import CausalLM

    counted = [0]
    own = CausalLM.loss_items

    def loss_items(self, batch):
        n = own(self, batch)
        counted[0] += int(n)
        return n

    CausalLM.loss_items = loss_items
    _steptimes.COUNTER = counted
    host = get_plugin_host(["_steptimes"])
    summary = train(validate(recipe(data, model, packing, steps, tmp), host=host), host, fresh=True)
    allocator = (summary.get("memory_plan") or {}).get("allocator")
    return {
        "stamps": _steptimes.STEPS,
        "counts": _steptimes.COUNTS,
        "losses": _steptimes.LOSSES,
        "allocator": allocator,
    }


def tokenized(data: Path, model: str):
    """The rows as adaptkit's causal_lm task encodes them: ``input_ids`` and ``labels``."""
    import datasets
    import transformers

    from adaptkit.recipe.schema import DataSpec
    from adaptkit_plugins.tasks.causal_lm import CausalLM

    task = CausalLM(DataSpec(source=str(data), prompt="prompt", response="response", max_length=MAX_LENGTH))
    rows = datasets.load_dataset("json", data_files=str(data), split="train")
    return task.encode(rows, transformers.AutoTokenizer.from_pretrained(model), str(data))


def run_trl(data: Path, model: str, packing: bool, steps: int, tmp: Path) -> dict:
    """TRL's SFTTrainer with peft on the same tokens; counts and stamps from a subclass and a callback."""
    import peft
    import transformers
    import trl

    stamps, counts, losses, counted = [], [], [], [0]

    class Counting(trl.SFTTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            counted[0] += int((inputs["labels"][..., 1:] != -100).sum())
            return super().compute_loss(model, inputs, *args, **kwargs)

    class Stamps(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(stamp(state.global_step))
            counts.append(counted[0])

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    config = trl.SFTConfig(
        output_dir=str(tmp / "trl"),
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_length=MAX_LENGTH,
        packing=packing,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    lora = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=LLAMA_LINEAR, task_type="CAUSAL_LM"
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    base = transformers.AutoModelForCausalLM.from_pretrained(model, dtype="float32")
    trainer = Counting(
        model=base,
        args=config,
        train_dataset=tokenized(data, model),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[Stamps()],
    )
    trainer.train()
    return {"stamps": stamps, "counts": counts, "losses": losses, "allocator": None}


def worker(loop: str, data: Path, model: str, steps: int) -> None:
    """Run one loop in this process and print its raw result as one JSON line."""
    os.environ.setdefault("ADAPTKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    packing = loop.endswith("-packed")
    with tempfile.TemporaryDirectory(prefix="vs-trl-") as tmp:
        run = run_trl if loop.startswith("trl") else run_adaptkit
        raw = run(data, model, packing, steps, Path(tmp))
    print("RESULT " + json.dumps({"loop": loop, **raw}), flush=True)


def measure(loop: str, data: Path, model: str, steps: int, warmup: int, env: dict) -> dict:
    """One run in a child process: supervised tokens per second over the timed steps, peak, last loss."""
    cmd = [sys.executable, __file__, "--worker", loop, str(data), model, str(steps + warmup)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{loop} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    raw = json.loads(lines[-1][len("RESULT ") :])
    stamps, counts = raw["stamps"], raw["counts"]
    assert len(stamps) == len(counts) == steps + warmup, (loop, len(stamps), len(counts))
    seconds = stamps[-1][1] - stamps[warmup - 1][1]
    supervised = counts[-1] - counts[warmup - 1]
    return raw | {
        "supervised_tokens_per_s": supervised / seconds,
        "supervised_tokens": supervised,
        "seconds": seconds,
        "peak_mib": stamps[-1][2],
        "last_loss": raw["losses"][-1] if raw["losses"] else None,
    }


def allocator_envs(data: Path, model: str) -> tuple[dict, dict, str | None]:
    """The environments of adaptkit's and TRL's processes, and the policy for freed memory adaptkit
    chooses for this run (adaptkit sets it itself; TRL's process gets it as glibc's settings)."""
    import torch

    from adaptkit.estimate.estimator import Estimator
    from adaptkit.estimate.machine import free_memory
    from adaptkit.host.manager import get_plugin_host
    from adaptkit.recipe.schema import validate
    from adaptkit.train.allocator import ALLOCATOR_ENV, POLICY_SETTINGS, choose_policy

    host = get_plugin_host()
    with tempfile.TemporaryDirectory() as tmp:
        est = Estimator(host, device="cpu", overhead_bytes=0, peak_tflops=0).estimate(
            validate(recipe(data, model, False, 10, Path(tmp)), host=host)
        )
    policy = choose_policy(est.total, est.largest_block, free_memory(torch.device("cpu")))
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV}
    return env, env | {k: str(v) for k, v in POLICY_SETTINGS.get(policy, {}).items()}, policy


def report(results: list[dict]) -> None:
    """Medians (min-max) per loop, then the ratios of medians."""
    by_loop = {loop: [r for r in results if r["loop"] == loop] for loop in LOOPS}
    med = {}
    for loop, runs in by_loop.items():
        tps = [r["supervised_tokens_per_s"] for r in runs]
        peaks = [r["peak_mib"] for r in runs]
        losses = [r["last_loss"] for r in runs if r["last_loss"] is not None]
        med[loop] = (median(tps), median(peaks))
        print(
            f"{loop:16s} supervised tokens/s {median(tps):8.1f} ({min(tps):.1f}-{max(tps):.1f})  "
            f"peak MiB {median(peaks):7.0f} ({min(peaks):.0f}-{max(peaks):.0f})  "
            f"last loss {median(losses) if losses else float('nan'):.4f}"
        )
    for mine, theirs in (
        ("adaptkit", "trl"),
        ("adaptkit-packed", "trl"),
        ("adaptkit-packed", "trl-packed"),
        ("adaptkit", "trl-packed"),
    ):
        speed = med[mine][0] / med[theirs][0]
        memory = med[mine][1] / med[theirs][1]
        print(f"{mine} / {theirs}: throughput x{speed:.2f}, peak memory x{memory:.2f}")


def main() -> None:
    """Write the data, run the rounds, keep every raw result, print the summary."""
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        loop, data, model, steps = sys.argv[2:6]
        return worker(loop, Path(data), model, int(steps))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="rounds of the four loops")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument("--order-seed", type=int, default=0, help="seed of the order within each round")
    parser.add_argument("--results", type=Path, help="raw results file (default: benchmarks/results/...)")
    args = parser.parse_args()
    stamp_ = time.strftime("%Y-%m-%d-%H%M%S")
    raw_file = args.results or Path(__file__).parent / "results" / f"vs_trl-{stamp_}.jsonl"
    model = model_path(MODEL)
    order = random.Random(args.order_seed)
    results = []
    with tempfile.TemporaryDirectory(prefix="vs-trl-data-") as tmp:
        data = Path(tmp) / "train.jsonl"
        write_rows(data)
        adaptkit_env, trl_env, policy = allocator_envs(data, model)
        print(f"{machine()}; freed memory: {policy or 'glibc default'}", flush=True)
        for round_ in range(args.repeats):
            for loop in order.sample(LOOPS, len(LOOPS)):
                env = trl_env if loop.startswith("trl") else adaptkit_env
                result = measure(loop, data, model, args.steps, args.warmup, env) | {"round": round_}
                results.append(result)
                with open(raw_file, "a") as f:
                    f.write(json.dumps(result) + "\n")
                print(
                    f"round {round_} {loop}: {result['supervised_tokens_per_s']:.1f} supervised tokens/s",
                    flush=True,
                )
    report(results)


if __name__ == "__main__":
    main()
