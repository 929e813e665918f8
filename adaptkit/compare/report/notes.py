"""How each column of the report is measured, worded from what the runs recorded (memory kind,
metric direction, throughput unit, forgetting measure): the notes under the report's table."""

from __future__ import annotations

from adaptkit.compare.report.aggregate import greater_is_better, has_baseline, metric_name, throughput_key

# Per memory kind a runner records: a short label for plot axes and the explanation for the notes.
MEMORY_KINDS = {
    "cpu_rss": (
        "CPU RSS",
        "the peak resident set size of the variant's process on the CPU "
        "(includes Python, the libraries and the data)",
    ),
    "gpu_allocated": (
        "GPU allocated",
        "the peak GPU memory torch allocated (torch.cuda.max_memory_allocated; "
        "without the CUDA context and the allocator's cache)",
    ),
}


def column_notes(variants: list[dict]) -> list[str]:
    """How each column is measured, one sentence or two per column."""
    metric = metric_name(variants)
    direction = "higher" if greater_is_better(variants) else "lower"
    kinds = sorted({v["memory_kind"] for v in variants if v["memory_kind"]})
    memory = (
        "; ".join(
            f"{MEMORY_KINDS[k][0]} runs: {MEMORY_KINDS[k][1]}" if len(kinds) > 1 else MEMORY_KINDS[k][1]
            for k in kinds
            if k in MEMORY_KINDS
        )
        or "peak memory of the variant's process"
    )
    measures = sorted({v["forgetting_measure"] for v in variants if v["forgetting_measure"]})
    unit = "tokens" if throughput_key(variants) == "tokens_per_s" else "samples"
    return [
        "Each variant ran once per seed; numbers are means over its finished seeds, "
        "with ± the sample standard deviation where there are several.",
        "trainable: parameters that receive gradient updates, and their share of all parameters.",
        f"peak MB: {memory}.",
        "wall s: wall-clock time of the variant's training loop (evaluations during training included; "
        f"loading and the final evaluation not); {unit}/s: {unit} trained on per second.",
        f"{metric}: the task metric on the validation split at the end of training ({direction} is better); "
        f"best {metric}: the best value over all evaluations.",
        *(
            [f"vs none: mean final {metric} minus that of the untouched pretrained model (variant 'none')."]
            if has_baseline(variants)
            else []
        ),
        "eval loss: validation loss at the end; overfit gap: eval loss minus training loss "
        "(positive: the model fits its training data better than unseen data).",
        "forgetting: change of loss on general text against the untouched base model; positive means "
        "the variant forgot some of what the base model knew"
        + (f" (measured as: {'; '.join(measures)})." if measures else "."),
        "saved: size on disk of what the variant saves (an adapter, a head, or all weights).",
        *confidence_notes(variants),
    ]


def confidence_notes(variants: list[dict]) -> list[str]:
    """How the intervals, the paired comparison and the time to target are computed."""
    metric = metric_name(variants)
    notes = [
        f"95% interval: where the variant's mean {metric} would fall with other evaluation examples and "
        "other seeds. A bootstrap (2,000 seeded replicates) resamples the seeds, then the final "
        "evaluation's examples within each; with one seed it covers the evaluation sample only; runs "
        "without per-example scores get a t interval over seeds (two seeds at least). With two or "
        "three seeds the seed part of the interval is itself rough.",
        "vs best: the variant's mean minus the best variant's, paired on the same seeds and evaluation "
        "examples, with its 95% bootstrap interval; ≈ marks an interval that contains zero (the two "
        "are indistinguishable on these runs). Each variant is compared with the best one only; the "
        "best is picked by its mean, so a near tie for first place may swap between reruns.",
    ]
    pairs = [v["vs_best"] for v in variants if v.get("vs_best")]
    if any(p.get("mcnemar_p") is not None for p in pairs):
        notes.append(
            "McNemar: the exact two-sided test on the examples that exactly one of the two variants "
            "got right (pooled over the shared seeds), in results.json and variants.csv."
        )
    if any(v.get("steps_to_target_mean") is not None for v in variants):
        notes.append(
            f"to 90%: the first evaluation at which a run's {metric} was within 10% of its own final "
            "value (steps, tokens and training seconds; mean over seeds); it can only be as fine as "
            "the evaluations were frequent."
        )
    if any(v.get("cost_mean") is not None for v in variants):
        notes.append(
            "cost: compare.cost_per_hour times the training loop's wall time (loading and the final "
            "evaluation not included); cost to 90%: the same for the time to target."
        )
    return notes


def estimate_notes(variants: list[dict]) -> list[str]:
    """One line per run whose memory estimate was skipped: it trained without the pre-flight
    check, or with ``micro_batch_size: auto``'s fallback instead of the estimate's choice."""
    return [
        f"{v['variant']} (seed {s['seed']}): memory estimate skipped, {s['reason']}"
        for v in variants
        for s in v.get("estimate_skipped", [])
    ]
