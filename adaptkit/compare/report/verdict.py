"""The report's opening words: which variants the runs can tell apart, in plain language.

Worded from the variant summaries alone (``aggregate``, with ``confidence``'s intervals and paired
comparisons), so the terminal, ``report.md``, ``report.html`` and ``results.json`` say the same.
"""

from __future__ import annotations

import math

from adaptkit.compare.report.aggregate import metric_name


def _num(x: float, signed: bool = False) -> str:
    """About four significant digits: 0.4583, 12.35, 0.001234; ``+0.0100`` with ``signed``."""
    if x == 0 or not math.isfinite(x):
        return f"{x:+g}" if signed else f"{x:g}"
    decimals = max(0, min(6, 3 - math.floor(math.log10(abs(x)))))
    return f"{x:+.{decimals}f}" if signed else f"{x:.{decimals}f}"


def _names(names: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _be(names: list[str]) -> str:
    return "is" if len(names) == 1 else "are"


def verdict(variants: list[dict]) -> list[str]:
    """The verdict, one sentence per item: the top group, who is clearly behind, what is unknown,
    and how many seeds or examples would separate the top two when they are indistinguishable."""
    scored = [v for v in variants if v.get("is_best") or v.get("final_metric_mean") is not None]
    best = next((v for v in scored if v.get("is_best")), None)
    metric = metric_name(variants)
    if best is None:
        return ["No variant finished, so there is nothing to compare."]
    if len(scored) == 1:
        return [
            f"Only {best['variant']} finished ({metric} {_num(best['final_metric_mean'])}): "
            "nothing to compare it with."
        ]
    others = [v for v in scored if v is not best]
    tied = [v for v in others if v["vs_best"] and not v["vs_best"]["distinguishable"]]
    behind = [v["variant"] for v in others if v["vs_best"] and v["vs_best"]["distinguishable"]]
    unknown = [v["variant"] for v in others if not v["vs_best"]]
    out = [_top_sentence(best, tied, metric)]
    if behind:
        out.append(f"{_names(behind)} {_be(behind)} clearly behind {best['variant']}.")
    if unknown:
        out.append(
            f"{_names(unknown)} cannot be told apart from {best['variant']} or not: "
            "with one seed and no per-example scores there is no interval."
        )
    # the runner-up carries the sample sizes (confidence.add_confidence); only worth saying when tied
    runner_up = next((v for v in tied if "seeds_needed" in v["vs_best"]), None)
    sentence = sample_size_sentence(runner_up, best) if runner_up else None
    return [*out, sentence] if sentence else out


def _top_sentence(best: dict, tied: list[dict], metric: str) -> str:
    """Who is best, and who is indistinguishable from it."""
    mean = _num(best["final_metric_mean"])
    if not tied:
        return f"{best['variant']} is best ({metric} {mean})."
    names = [best["variant"], *(v["variant"] for v in tied)]
    if len(tied) == 1:
        pair = tied[0]["vs_best"]
        return (
            f"{_names(names)} are indistinguishable here: {tied[0]['variant']} differs from "
            f"{best['variant']}'s {metric} of {mean} by {_num(pair['difference'], True)} "
            f"(95% interval {_num(pair['low'], True)} to {_num(pair['high'], True)})."
        )
    return (
        f"{_names(names)} are indistinguishable here ({best['variant']} has the best mean {metric}, {mean})."
    )


def sample_size_sentence(runner_up: dict, best: dict) -> str | None:
    """How many seeds or evaluation examples would separate the top two, from the measured spreads."""
    pair = runner_up["vs_best"]
    seeds, examples = pair.get("seeds_needed"), pair.get("examples_needed")
    if seeds is None and examples is None:
        return None
    diff = abs(runner_up["final_metric_mean"] - best["final_metric_mean"])
    ways = []
    if seeds is not None:
        ways.append(f"about {seeds:,} seeds per variant (from the seed-to-seed spread)")
    if examples is not None:
        ways.append(f"about {examples:,} evaluation examples (from the per-example differences, one seed)")
    return (
        f"If the difference of {_num(diff)} between {best['variant']} and {runner_up['variant']} is real, "
        f"a test at the 5% level would find it 80% of the time with {' or '.join(ways)}."
    )
