"""The schema of a comparison (the ``compare:`` section) and the plan made from it: jobs by variant."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from adaptkit.recipe.schema import ForgettingSpec, Section

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class Variant(Section):
    """One entry of ``compare.variants``: a strategy stack and recipe overrides."""

    name: str = Field(pattern=_NAME, description="variant name (letters, digits, _ . -)")
    strategies: list[str | dict[str, Any]] | None = Field(
        None, min_length=1, description="the stack (default: the base recipe's)"
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="recipe overrides {dotted.key: value}"
    )
    grid: dict[str, list[Any]] = Field(
        default_factory=dict, description="{dotted.key: [values]}: one variant per combination"
    )


class Budget(Section):
    """``compare.budget``: the same training budget for every variant (exactly one kind)."""

    steps: int | None = Field(None, ge=1, description="optimizer steps")
    tokens: int | None = Field(None, ge=1, description="training tokens")
    seconds: float | None = Field(None, gt=0, description="seconds of training")

    @model_validator(mode="after")
    def _one(self) -> Budget:
        if sum(v is not None for v in (self.steps, self.tokens, self.seconds)) != 1:
            raise ValueError("give exactly one of steps, tokens or seconds")
        return self


class SearchParam(Section):
    """A search dimension: a range (``low``/``high``, ``log``, ``integer``) or ``choices``."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _range_or_choices(self) -> SearchParam:
        if self.choices is None and (self.low is None or self.high is None or self.low >= self.high):
            raise ValueError("give choices, or low < high")
        if self.log and self.low is not None and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self


class Search(Section):
    """``compare.search``: Bayesian optimisation with Optuna (TPE), per variant, with pruning."""

    method: Literal["optuna"] = "optuna"
    trials: int = Field(8, ge=1, description="trials per variant")
    space: dict[str, SearchParam] = Field(
        min_length=1, description="{dotted.key: {low, high, log} | {choices}}"
    )
    metric: str | None = Field(None, description="metric to optimise (default: the one the runs select on)")
    direction: Literal["maximize", "minimize"] | None = Field(None, description="default: from the metric")
    pruning: bool = Field(
        True, description="stop trials whose intermediate evaluations are poor (median rule)"
    )
    storage: str | None = Field(
        None,
        description="Optuna storage URL of the studies (sqlite:///..., postgresql://..., mysql://...); "
        "default: sqlite:///<comparison>/search.db",
    )
    workers: int = Field(
        1, ge=1, description="trials of one variant's search run at once (each a run of its own)"
    )


class RaySpec(Section):
    """``compare.ray``: where the runs of ``executor: ray`` go and what each one claims."""

    address: str | None = Field(
        None,
        description="an existing Ray cluster (auto, HOST:6379, ray://HOST:10001); "
        "null: start a local Ray instance for the comparison and stop it after",
    )
    cpus_per_run: float = Field(1, gt=0, description="CPUs each run claims (and its torch threads)")
    gpus_per_run: float = Field(0, ge=0, description="GPUs each run claims (Ray pins them)")


class CompareSpec(Section):
    """The ``compare:`` section of a comparison recipe."""

    variants: list[Variant] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="applied to every variant")
    budget: Budget | None = None
    lr: Literal["auto", "sweep", "fixed"] | None = Field(
        None,
        description="how a variant without its own train.lr gets one: auto (a learning-rate range test "
        "on its first seed), sweep (each rate of lr_sweep), fixed (the base recipe's); default: sweep "
        "with lr_sweep, the search's choice with search, else auto",
    )
    lr_sweep: list[float] = Field(
        default_factory=list, description="learning rates tried per variant (on the first seed)"
    )
    search: Search | None = None
    forgetting: ForgettingSpec | None = Field(
        default_factory=ForgettingSpec, description="null turns the measure off"
    )
    launch: list[str] = Field(
        default_factory=list, description="arguments for `accelerate launch` used for every run"
    )
    cost_per_hour: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        description="price of the machine per hour: the report adds each run's cost",
    )
    executor: Literal["local", "ray"] = Field(
        "local", description="where the runs go: child processes on this machine, or Ray tasks"
    )
    parallel: int = Field(
        1,
        ge=1,
        validate_default=True,  # the check against search.workers applies to the default too
        description="runs at once on the local executor; with GPUs each gets its own GPU",
    )
    threads_per_run: int | None = Field(
        None,
        ge=1,
        description="CPU threads of each run (OMP_NUM_THREADS); default: all cores with one run at "
        "a time, the cores shared out with parallel > 1, cpus_per_run with Ray",
    )
    ray: RaySpec | None = Field(None, description="the Ray cluster and each run's resources (executor: ray)")

    @model_validator(mode="after")
    def _consistent(self) -> CompareSpec:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique (got {names})")
        if self.lr_sweep and self.search:
            raise ValueError("use either lr_sweep or search, not both")
        if (self.lr == "sweep") != bool(self.lr_sweep) and self.lr is not None:
            raise ValueError("lr: sweep goes with lr_sweep (the rates to try), and lr_sweep with lr: sweep")
        return self

    @field_validator("parallel")
    @classmethod
    def _parallel(cls, parallel: int, info: ValidationInfo) -> int:
        """Concurrency is the local executor's, and must cover the search's workers and one GPU a run."""
        data = info.data
        workers = data["search"].workers if data.get("search") else 1
        if data.get("executor") == "ray" and parallel > 1:
            raise ValueError(
                "runs at once are for executor: local; with executor: ray, Ray runs as many as the "
                "cluster holds (set ray.cpus_per_run / ray.gpus_per_run)"
            )
        if data.get("executor") != "ray" and workers > parallel:
            raise ValueError(
                f"search.workers: {workers} trials at once need parallel: {workers} or more on the "
                "local executor (or executor: ray)"
            )
        if parallel > 1 and _launch_processes(data.get("launch") or []) > 1:
            raise ValueError(
                "each run at once gets one GPU, but launch: starts several processes per run; use "
                "parallel: 1, or executor: ray with ray.gpus_per_run"
            )
        return parallel

    @field_validator("ray")
    @classmethod
    def _ray(cls, ray: RaySpec | None, info: ValidationInfo) -> RaySpec | None:
        """Ray's settings without executor: ray would be silently ignored."""
        if ray is not None and info.data.get("executor") != "ray":
            raise ValueError("these settings are for executor: ray (add executor: ray, or remove ray:)")
        return ray

    @property
    def lr_mode(self) -> str:
        """How variants without their own rate get one: auto, sweep, fixed, or search."""
        return self.lr or ("sweep" if self.lr_sweep else "search" if self.search else "auto")


def _launch_processes(launch: list[str]) -> int:
    """The ``--num_processes`` of ``accelerate launch`` arguments (2 for a bare ``--multi_gpu``, else 1)."""
    for i, arg in enumerate(launch):
        value = arg.split("=", 1)[1] if arg.startswith("--num_processes=") else None
        if arg == "--num_processes" and i + 1 < len(launch):
            value = launch[i + 1]
        if value is not None:
            return int(value) if value.isdigit() else 1
    return 2 if "--multi_gpu" in launch else 1


@dataclass
class Job:
    """One run of the comparison: a resolved recipe, its seed and its directory name."""

    variant: str
    seed: int
    key: str
    raw: dict[str, Any]
    trains: bool = True
    tunes_lr: bool = True


@dataclass
class Plan:
    """A comparison resolved into variants (each a list of jobs, one per seed)."""

    name: str
    root: Path
    spec: CompareSpec
    base: dict[str, Any]
    host: Any = None
    variants: dict[str, list[Job]] = field(default_factory=dict)
    #: What planning changed for fairness, said before the runs start.
    notes: list[str] = field(default_factory=list)
