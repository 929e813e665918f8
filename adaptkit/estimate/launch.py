"""How a run is launched, as far as its memory per process goes: how many processes, and whether
FSDP shards the model over them. Read from ``adaptkit estimate``'s flags (``--num-processes N``,
``--fsdp``), from an Accelerate config file (``--accelerate-config FILE``), or from a running
``Accelerator`` (the pre-flight check of a launched run).

Only launches whose memory the estimate models are accepted: one process, DDP (a full replica
per process) and FSDP2 through Accelerate with full sharding (``reshard_after_forward: true``,
FULL_SHARD) or parameters kept after the forward pass (``false``, SHARD_GRAD_OP), wrapped by
transformer block or not at all. Anything else (DeepSpeed, FSDP1, hybrid sharding, CPU offload,
size-based wrapping) is refused with a message naming the key, rather than estimated wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from adaptkit.errors import ConfigError

#: Accelerate's ``distributed_type`` values that run a full replica per process (DDP).
REPLICATED = ("MULTI_GPU", "MULTI_CPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA")


@dataclass(frozen=True)
class Launch:
    """A launch: ``num_processes`` and ``sharding`` (``none``: one process or DDP; ``fsdp``).

    For FSDP: ``reshard_after_forward`` (True: FULL_SHARD, each unit's parameters are freed after
    its forward; False: SHARD_GRAD_OP, they stay gathered until its backward) and ``wrap``
    (``blocks``: one FSDP unit per transformer block, Accelerate's TRANSFORMER_BASED_WRAP;
    ``none``: NO_WRAP, the blocks stay in the root unit). ``source`` says where it was read.
    """

    num_processes: int = 1
    sharding: str = "none"
    reshard_after_forward: bool = True
    wrap: str = "blocks"
    source: str = ""

    @property
    def single(self) -> bool:
        """One process, nothing sharded: the estimate as it always was."""
        return self.num_processes == 1 and self.sharding == "none"

    @property
    def distributed_type(self) -> str:
        """Accelerate's name for this launch (what training's loss choice looks at)."""
        if self.sharding == "fsdp":
            return "FSDP"
        return "NO" if self.num_processes == 1 else "MULTI_GPU"

    @property
    def kind(self) -> str:
        """``one process``, ``DDP``, ``FSDP full shard`` or ``FSDP shard grad op``."""
        if self.sharding == "fsdp":
            return "FSDP full shard" if self.reshard_after_forward else "FSDP shard grad op"
        return "one process" if self.num_processes == 1 else "DDP"

    def describe(self) -> str:
        """The table's heading: ``per process, 4 processes, FSDP full shard (an estimate)``."""
        plural = "process" if self.num_processes == 1 else "processes"
        wrap = ", no wrap policy" if self.sharding == "fsdp" and self.wrap == "none" else ""
        return f"per process, {self.num_processes} {plural}, {self.kind}{wrap} (an estimate)"


def parse_num_processes(text: str | None, what: str = "--num-processes") -> int | None:
    """A whole number of processes of at least 1 (None when not given); anything else is a
    ConfigError naming ``what``."""
    if text is None:
        return None
    digits = str(text).strip()
    if not digits.isdigit() or int(digits) < 1:
        raise ConfigError(f"{what}: '{text}' is not a number of processes; give a whole number of at least 1")
    return int(digits)


def launch_from_flags(num_processes: str | None, fsdp: bool, accelerate_config: str | None) -> Launch | None:
    """The launch ``adaptkit estimate``'s flags describe, or None (one process, as without them).

    ``--accelerate-config`` goes alone; ``--fsdp`` needs ``--num-processes``. ``--fsdp`` is what
    ``examples/accelerate/fsdp.yaml`` sets: FSDP2, full shard, one unit per transformer block.
    """
    if accelerate_config is not None:
        if num_processes is not None or fsdp:
            given = "--num-processes" if num_processes is not None else "--fsdp"
            raise ConfigError(
                f"--accelerate-config and {given} both describe the launch; give one of them "
                "(the config file's num_processes and distributed_type, or the flags)"
            )
        return read_accelerate_config(accelerate_config)
    n = parse_num_processes(num_processes)
    if n is None:
        if fsdp:
            raise ConfigError("--fsdp: give the number of processes to shard over with --num-processes N")
        return None
    flags = f"--num-processes {n}" + (" --fsdp" if fsdp else "")
    return Launch(num_processes=n, sharding="fsdp" if fsdp else "none", source=flags)


def read_accelerate_config(path: str) -> Launch:
    """The launch an Accelerate config file describes: ``num_processes`` (all machines together),
    ``distributed_type`` and, under FSDP, ``fsdp_config``. A file that cannot be read, is not such a
    config, or asks for a launch the estimate does not model is a ConfigError naming it."""
    import yaml

    where = f"--accelerate-config {path}"
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        first = " ".join(str(exc).split())
        raise ConfigError(f"{where}: is not YAML ({first})") from None
    if not isinstance(raw, dict) or "distributed_type" not in raw:
        raise ConfigError(f"{where}: is not an Accelerate config (no distributed_type)")
    kind = str(raw["distributed_type"]).upper()
    n = parse_num_processes(raw.get("num_processes", 1), f"{where}: num_processes")
    source = f"accelerate config {path}"
    if kind == "NO":
        if n != 1:
            raise ConfigError(f"{where}: distributed_type NO runs one process, but num_processes is {n}")
        return Launch(num_processes=1, source=source)
    if kind in REPLICATED:
        return Launch(num_processes=n, source=source)
    if kind == "FSDP":
        return _fsdp_launch(raw.get("fsdp_config") or {}, n, where, source)
    raise ConfigError(
        f"{where}: distributed_type {kind} is not modelled by the estimate "
        f"(it models NO, {', '.join(REPLICATED[:2])} and FSDP with fsdp_version 2)"
    )


def _fsdp_launch(cfg: dict[str, Any], n: int, where: str, source: str) -> Launch:
    """The FSDP launch an ``fsdp_config`` section describes, or a ConfigError naming its key."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: fsdp_config is not a mapping")
    version = cfg.get("fsdp_version", 1)  # Accelerate's default is FSDP1
    if str(version) != "2":
        raise ConfigError(
            f"{where}: fsdp_config.fsdp_version is {version}; the estimate models FSDP2 "
            "(set fsdp_version: 2, as examples/accelerate/fsdp.yaml does)"
        )
    if _truthy(cfg.get("fsdp_offload_params", False)):
        raise ConfigError(
            f"{where}: fsdp_config.fsdp_offload_params: CPU offload is not modelled by the estimate"
        )
    reshard = _reshard_after_forward(cfg, where)
    policy = str(cfg.get("fsdp_auto_wrap_policy", "NO_WRAP")).upper()  # Accelerate's default
    if policy not in ("TRANSFORMER_BASED_WRAP", "NO_WRAP"):
        raise ConfigError(
            f"{where}: fsdp_config.fsdp_auto_wrap_policy {policy} is not modelled by the estimate "
            "(TRANSFORMER_BASED_WRAP or NO_WRAP)"
        )
    wrap = "blocks" if policy == "TRANSFORMER_BASED_WRAP" else "none"
    return Launch(num_processes=n, sharding="fsdp", reshard_after_forward=reshard, wrap=wrap, source=source)


def _reshard_after_forward(cfg: dict[str, Any], where: str) -> bool:
    """FSDP2's ``fsdp_reshard_after_forward`` (a bool, or FSDP1's strategy names that map onto one)."""
    value = cfg.get("fsdp_reshard_after_forward", cfg.get("fsdp_sharding_strategy", True))
    if isinstance(value, bool):
        return value
    name = str(value).upper()
    if name in ("TRUE", "FULL_SHARD", "1"):
        return True
    if name in ("FALSE", "SHARD_GRAD_OP", "2"):
        return False
    raise ConfigError(
        f"{where}: fsdp_config.fsdp_reshard_after_forward {value} is not modelled by the estimate "
        "(true: FULL_SHARD, or false: SHARD_GRAD_OP; no NO_SHARD or hybrid sharding)"
    )


def _truthy(value: Any) -> bool:
    return value is True or str(value).strip().lower() in ("true", "1", "yes")


def launch_of(accelerator: Any) -> Launch:
    """The launch a running ``Accelerator`` is part of (for training's pre-flight check).

    Under FSDP the plugin's settings are read as the config file's would be; a setting the
    estimate does not model gives the nearest modelled launch (full shard, by block), since an
    estimate never blocks training on its own account. Any other launch (DeepSpeed) is a
    ConfigError: training then records the estimate as skipped rather than checking a wrong one.
    """
    n = int(accelerator.num_processes)
    kind = accelerator.distributed_type.value
    if kind not in ("NO", "FSDP", *REPLICATED):
        raise ConfigError(
            f"the memory estimate does not model {kind} launches (one process, DDP and FSDP2 only)"
        )
    if kind != "FSDP":
        return Launch(num_processes=n, source=f"{kind} launch")
    plugin = accelerator.state.fsdp_plugin
    reshard = getattr(plugin, "reshard_after_forward", True)
    policy = getattr(plugin, "auto_wrap_policy", None)
    wrap = "none" if policy is None else "blocks"
    return Launch(
        num_processes=n,
        sharding="fsdp",
        reshard_after_forward=reshard if isinstance(reshard, bool) else True,
        wrap=wrap,
        source="FSDP launch",
    )


def check_device(
    device: str | None,
    launch: Launch | None,
    device_memory: str | None,
    peak_tflops: float | None,
    accelerate_config: str | None = None,
) -> None:
    """Refuse what ``adaptkit estimate`` cannot do here, naming the flags that would do it: FSDP on
    a CPU (Accelerate runs FSDP on GPUs only), or a CUDA device this machine has not got, which
    cannot be asked for its free memory or measured for its matmul rate."""
    import torch

    has_cuda = torch.cuda.is_available()
    device = device or ("cuda" if has_cuda else "cpu")
    if launch is not None and launch.sharding == "fsdp" and device == "cpu":
        where = f"--accelerate-config {accelerate_config}" if accelerate_config else "--fsdp"
        raise ConfigError(
            f"{where}: FSDP runs on GPUs (Accelerate has no FSDP on a CPU); estimate for one with "
            "--device cuda" + ("" if has_cuda else ", --device-memory SIZE and --peak-tflops X (0: none)")
        )
    if device == "cuda" and not has_cuda and (device_memory is None or peak_tflops is None):
        raise ConfigError(
            "--device cuda: this machine has no CUDA device to read free memory or a matmul rate from; "
            "give --device-memory SIZE and --peak-tflops X (0: no time estimate)"
        )
