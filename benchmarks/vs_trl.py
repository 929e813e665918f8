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
problems of six kinds, from a one-digit answer to a sorted word list, so lengths vary; a separate
validation file keeps adaptkit from holding training rows out. Unpacked, TRL draws the rows in
adaptkit's order (its sampler is adaptkit's seeded permutation), so the two unpacked loops train
on the same batches and their losses can be compared step by step. Same model, LoRA (r 8, alpha
16, no dropout, the seven linear layers of every block), AdamW at a constant 1e-4 without weight
decay, micro-batch 8 rows of at most 256 tokens, seed 0, and the same policy for freed memory
(the one adaptkit chooses, given to TRL's process as glibc environment variables). Both run in
float32 and both with gradient checkpointing or both without (``--checkpointing``): TRL's
``SFTConfig`` defaults to bf16 autocast and to gradient checkpointing, which the comparison turns
off or matches. Each run trains ``--warmup`` untimed steps and ``--steps`` timed ones.

Throughput is supervised tokens per second: the tokens whose next token is a label (not -100),
counted inside each training step on the batch the model trained on, over the timed steps.
``--repeats`` rounds (5 by default), the four loops in an order drawn at random each round
(seeded by ``--order-seed``). It prints the median (min-max) of supervised tokens per second, peak
resident memory and the last step's loss for each loop, the ratios of medians, and the largest
difference between the unpacked loops' losses at the same step. Every run's raw result goes, one
JSON line each, to ``benchmarks/results/vs_trl-<date and time>.jsonl``.

    pip install trl   # not a dependency of adaptkit
    python benchmarks/vs_trl.py [--repeats 5] [--steps 5] [--warmup 1] [--checkpointing] [--loops trl,adaptkit]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import LLAMA_LINEAR, child_result, machine, median, model_path, stamp  # noqa: E402

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


def write_rows(directory: Path) -> None:
    """``train.jsonl``: the rows (prompt, response) of every task, shuffled with seed 0;
    ``validation.jsonl``: two other problems of each task."""
    import reasoning_gym

    for split, size, seed in (("train", ROWS_PER_TASK, 0), ("validation", 2, 1)):
        rows = []
        for task in TASKS:
            for entry in reasoning_gym.create_dataset(task, size=size, seed=seed):
                rows.append({"prompt": entry["question"], "response": str(entry["answer"])})
        random.Random(0).shuffle(rows)
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def recipe(data: Path, model: str, packing: bool, checkpointing: bool, steps: int, out: Path) -> dict:
    """The adaptkit recipe of the ``adaptkit`` loops."""
    return {
        "name": "vs-trl",
        "model": {"source": model, "task": "causal_lm", "gradient_checkpointing": checkpointing},
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


def run_adaptkit(data: Path, model: str, packing: bool, checkpointing: bool, steps: int, tmp: Path) -> dict:
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
    run = recipe(data, model, packing, checkpointing, steps, tmp)
    summary = train(validate(run, host=host), host, fresh=True)
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

    train_file = data / "train.jsonl"
    task = CausalLM(DataSpec(source=str(data), prompt="prompt", response="response", max_length=MAX_LENGTH))
    rows = datasets.load_dataset("json", data_files=str(train_file), split="train")
    return task.encode(rows, transformers.AutoTokenizer.from_pretrained(model), str(train_file))


def run_trl(data: Path, model: str, packing: bool, checkpointing: bool, steps: int, tmp: Path) -> dict:
    """TRL's SFTTrainer with peft on the same tokens; counts and stamps from a subclass and a callback."""
    import peft
    import transformers
    import trl

    from adaptkit.train.sampling import EpochSampler

    stamps, counts, losses, counted = [], [], [], [0]

    class Counting(trl.SFTTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            counted[0] += int((inputs["labels"][..., 1:] != -100).sum())
            return super().compute_loss(model, inputs, *args, **kwargs)

        def _get_train_sampler(self, train_dataset=None):
            if packing:  # TRL's packed rows are its own: its own order
                return super()._get_train_sampler(train_dataset)
            return EpochSampler(len(train_dataset or self.train_dataset), seed=0)  # adaptkit's first epoch

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
        bf16=False,  # TRL's default is bf16 autocast; both loops train in float32
        gradient_checkpointing=checkpointing,  # TRL's default is on; matched to adaptkit's run
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


def worker(loop: str, data: Path, model: str, checkpointing: bool, steps: int) -> None:
    """Run one loop in this process and print its raw result as one JSON line."""
    os.environ.setdefault("ADAPTKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    packing = loop.endswith("-packed")
    with tempfile.TemporaryDirectory(prefix="vs-trl-") as tmp:
        run = run_trl if loop.startswith("trl") else run_adaptkit
        raw = run(data, model, packing, checkpointing, steps, Path(tmp))
    print("RESULT " + json.dumps({"loop": loop, **raw}), flush=True)


def measure(
    loop: str, data: Path, model: str, checkpointing: bool, steps: int, warmup: int, env: dict
) -> dict:
    """One run in a child process: supervised tokens per second over the timed steps, peak, last loss."""
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        loop,
        str(data),
        model,
        str(int(checkpointing)),
        str(steps + warmup),
    ]
    raw = child_result(cmd, env, loop)
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
            validate(recipe(data, model, False, False, 10, Path(tmp)), host=host)
        )
    policy = choose_policy(est.total, est.largest_block, free_memory(torch.device("cpu")))
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV}
    return env, env | {k: str(v) for k, v in POLICY_SETTINGS.get(policy, {}).items()}, policy


def report(results: list[dict], loops: list[str]) -> None:
    """Medians (min-max) per loop, the ratios of medians, and the unpacked loops' losses step by step."""
    by_loop = {loop: [r for r in results if r["loop"] == loop] for loop in loops}
    med = {}
    for loop, runs in by_loop.items():
        tps = [r["supervised_tokens_per_s"] for r in runs]
        peaks = [r["peak_mib"] for r in runs]
        losses = [r["last_loss"] for r in runs if r["last_loss"] is not None]
        med[loop] = (median(tps), median(peaks), median(losses) if losses else float("nan"))
        print(
            f"{loop:16s} supervised tokens/s {median(tps):8.1f} ({min(tps):.1f}-{max(tps):.1f})  "
            f"peak MiB {median(peaks):7.0f} ({min(peaks):.0f}-{max(peaks):.0f})  "
            f"last loss {median(losses) if losses else float('nan'):.4f}"
        )
    for mine, theirs in PAIRS:
        if mine in med and theirs in med:
            speed, memory, loss = (med[mine][i] / med[theirs][i] for i in range(3))
            print(
                f"{mine} / {theirs}: throughput x{speed:.2f}, peak memory x{memory:.2f}, last loss x{loss:.3f}"
            )
    if by_loop.get("trl") and by_loop.get("adaptkit"):
        same_order(by_loop["trl"][0], by_loop["adaptkit"][0])


PAIRS = (
    ("adaptkit", "trl"),
    ("adaptkit-packed", "trl"),
    ("adaptkit-packed", "trl-packed"),
    ("adaptkit", "trl-packed"),
)


def same_order(trl: dict, adaptkit: dict) -> None:
    """The unpacked loops train on the same batches: their supervised tokens and losses, step by step."""
    tokens = [b - a for a, b in zip([0, *trl["counts"]], trl["counts"])]
    mine = [b - a for a, b in zip([0, *adaptkit["counts"]], adaptkit["counts"])]
    print(
        f"supervised tokens a step: TRL {tokens}, adaptkit {mine} ({'the same' if tokens == mine else 'DIFFERENT'})"
    )
    pairs = list(zip(trl["losses"], adaptkit["losses"]))
    print("loss a step (TRL, adaptkit): " + ", ".join(f"{a:.4f}/{b:.4f}" for a, b in pairs))
    print(f"largest difference of the losses at one step: {max(abs(a - b) for a, b in pairs):.2e}")


def main() -> None:
    """Write the data, run the rounds, keep every raw result, print the summary."""
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        loop, data, model, checkpointing, steps = sys.argv[2:7]
        return worker(loop, Path(data), model, checkpointing == "1", int(steps))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="rounds of the loops")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in every loop")
    parser.add_argument("--loops", default=",".join(LOOPS), help=f"comma-separated, of {', '.join(LOOPS)}")
    parser.add_argument("--order-seed", type=int, default=0, help="seed of the order within each round")
    parser.add_argument("--results", type=Path, help="raw results file (default: benchmarks/results/...)")
    parser.add_argument("--report", type=Path, help="print the summary of a raw results file; run nothing")
    args = parser.parse_args()
    if args.report:
        results = [json.loads(line) for line in args.report.read_text().splitlines()]
        return report(results, [loop for loop in LOOPS if any(r["loop"] == loop for r in results)])
    loops = args.loops.split(",")
    if not set(loops) <= set(LOOPS):
        parser.error(f"--loops: {args.loops!r}: each must be one of {', '.join(LOOPS)}")
    stamp_ = time.strftime("%Y-%m-%d-%H%M%S")
    raw_file = args.results or Path(__file__).parent / "results" / f"vs_trl-{stamp_}.jsonl"
    model = model_path(MODEL)
    order = random.Random(args.order_seed)
    results = []
    with tempfile.TemporaryDirectory(prefix="vs-trl-data-") as tmp:
        data = Path(tmp)
        write_rows(data)
        adaptkit_env, trl_env, policy = allocator_envs(data, model)
        print(
            f"{machine()}; freed memory: {policy or 'glibc default'}; float32; gradient checkpointing "
            f"{'on' if args.checkpointing else 'off'} in every loop",
            flush=True,
        )
        for round_ in range(args.repeats):
            for loop in order.sample(loops, len(loops)):
                env = trl_env if loop.startswith("trl") else adaptkit_env
                result = measure(loop, data, model, args.checkpointing, args.steps, args.warmup, env)
                result |= {"round": round_, "checkpointing": args.checkpointing}
                results.append(result)
                with open(raw_file, "a") as f:
                    f.write(json.dumps(result) + "\n")
                print(
                    f"round {round_} {loop}: {result['supervised_tokens_per_s']:.1f} supervised tokens/s",
                    flush=True,
                )
    report(results, loops)


if __name__ == "__main__":
    main()
