"""Comparisons: a recipe's ``compare:`` section turned into a plan of runs, each run in its own
process, the optional Optuna search, and the report (table, plots, HTML)."""

from adaptkit.compare.execute import execute
from adaptkit.compare.plan import is_comparison, plan
from adaptkit.compare.results import write_report

__all__ = ["execute", "is_comparison", "plan", "write_report"]
