"""The schema of a comparison (the ``compare:`` section) and the plan made from it: jobs by variant."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

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

    @property
    def lr_mode(self) -> str:
        """How variants without their own rate get one: auto, sweep, fixed, or search."""
        return self.lr or ("sweep" if self.lr_sweep else "search" if self.search else "auto")


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
