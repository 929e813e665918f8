"""Setting a run up: the Accelerator, quiet libraries, float32 trainables and the loaders."""

from __future__ import annotations

import os
from typing import Any

from adaptkit.errors import ConfigError, LaunchError


def make_accelerator(spec: Any, run_dir: Any, report_to: list[str]) -> Any:
    """The Accelerator for the recipe's precision and accumulation; fp16 is refused on the CPU."""
    import torch
    from accelerate import Accelerator

    if spec.mixed_precision == "fp16" and not torch.accelerator.is_available():
        # Accelerate runs no fp16 autocast on the CPU: the run would train in float32 while its
        # summary said fp16
        raise ConfigError(
            [
                (
                    "train.mixed_precision",
                    "fp16 needs a GPU (Accelerate has no fp16 autocast on the CPU); "
                    "on the CPU use bf16 or no",
                )
            ]
        )
    # cpu=True on machines without an accelerator: only then does Accelerate treat a launch of
    # several processes (accelerate launch --multi_gpu, torchrun) as MULTI_CPU on gloo.
    return Accelerator(
        mixed_precision=spec.mixed_precision,
        gradient_accumulation_steps=spec.gradient_accumulation,
        cpu=not torch.accelerator.is_available(),
        log_with=report_to or None,
        project_dir=str(run_dir / "tracking") if report_to else None,
    )


def upcast_trainables(model: Any, acc: Any, log: Any) -> None:
    """Train in float32: GradScaler and optimizers need float32 master weights, never fp16 ones.

    Frozen half-precision weights stay as they are; where Accelerate runs no autocast, the
    forward pass runs under torch's, since a matmul mixing the two dtypes fails otherwise.
    """
    import torch

    upcast = [n for n, p in model.named_parameters() if p.requires_grad and p.dtype != torch.float32]
    if not upcast:
        return
    log(f"adaptkit: upcasting {len(upcast)} trainable tensors to float32 (e.g. {upcast[0]})")
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    half = next(
        (p.dtype for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32), None
    )
    if half is not None and not acc.native_amp:
        model.forward = torch.autocast(acc.device.type, dtype=half)(model.forward)
        log(
            f"adaptkit: the frozen weights stay {str(half).removeprefix('torch.')}; the forward pass runs under autocast"
        )


def make_loaders(train_ds: Any, eval_ds: Any, sampler: Any, collate: Any, batch_size: int, seed: int):
    """The training loader (in the sampler's order) and the evaluation loader."""
    import torch

    # Own generators: a DataLoader without one draws a seed from the global RNG each time it is
    # iterated, which would shift dropout masks between a resumed and an uninterrupted run.
    return (
        torch.utils.data.DataLoader(
            train_ds,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(seed),
        ),
        torch.utils.data.DataLoader(
            eval_ds,
            batch_size=batch_size,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(seed),
        ),
    )


def trackers(spec: Any) -> list[str]:
    """The Accelerate trackers ``train.report_to`` names; a ConfigError when one is not installed."""
    from accelerate.utils import is_tensorboard_available

    installed = {"tensorboard": is_tensorboard_available}
    for name in spec.report_to:
        if not installed[name]():
            raise ConfigError(
                [("train.report_to", f"'{name}' is not installed; pip install {name}, or leave it out")]
            )
    return list(spec.report_to)


def quiet_libraries() -> None:
    """Silence progress bars and load reports of datasets and transformers: adaptkit reports progress itself."""
    import logging

    import datasets
    import transformers

    # bitsandbytes warns on every CPU import that an optional hub-downloaded kernel is missing;
    # its own fallback kernel is used, so the warning only alarms users.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


#: Accelerate's launch settings that shard the model, and the environment variable each sets.
SHARDED_LAUNCHES = {"FSDP": "ACCELERATE_USE_FSDP", "DeepSpeed": "ACCELERATE_USE_DEEPSPEED"}


def check_launch() -> None:
    """Refuse a launch adaptkit cannot run correctly, before anything is loaded or written.

    FSDP and DeepSpeed need GPUs under Accelerate: on a machine without them a sharded launch
    either fails deep inside Accelerate or runs unsharded processes that only look sharded.
    """
    import torch

    for name, variable in SHARDED_LAUNCHES.items():
        if (
            os.environ.get(variable, "").lower() in ("1", "true", "yes")
            and not torch.accelerator.is_available()
        ):
            raise LaunchError(
                f"this launch asks for {name} ({variable}=true), which needs GPUs, and this machine has "
                "none; on CPUs launch several processes with DDP instead "
                "(accelerate launch --multi_gpu --num_processes N -m adaptkit train RECIPE)"
            )
