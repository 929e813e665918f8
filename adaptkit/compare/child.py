"""One run of a comparison in its own process, and the report row read back from its directory.

A child process per run gives clean memory figures (its peak resident set is its own) and
isolates crashes: an error or an out-of-memory kill in one run becomes a failed row, and the
comparison goes on with the next.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adaptkit.compare.report.stats import time_to_target
from adaptkit.train.checkpoint import checkpoint_dirs, step_of
from adaptkit.train.evaluate import EXAMPLES_FILE
from adaptkit.train.state import RunSummary

ERROR_PREFIX = "adaptkit: error:"


def command(recipe_file: Path, plugins: list[str], launch: list[str]) -> list[str]:
    """The command that trains one recipe: ``python -m adaptkit train``, under ``accelerate launch`` when asked."""
    plugin_args = [a for p in plugins for a in ("-p", p)]
    return adaptkit_command([*plugin_args, "train", str(recipe_file)], launch)


def adaptkit_command(args: list[str], launch: list[str]) -> list[str]:
    """``python -m adaptkit ARGS``, under ``accelerate launch LAUNCH`` when ``launch`` is given."""
    if launch:
        return [sys.executable, "-m", "accelerate.commands.launch", *launch, "-m", "adaptkit", *args]
    return [sys.executable, "-m", "adaptkit", *args]


def run_child(
    cmd: list[str],
    log_file: Path,
    poll: Callable[[], bool] | None = None,
    echo: bool = True,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
) -> tuple[int, str]:
    """Run ``cmd``, teeing its output to the terminal and ``log_file``; return (exit status, error line).

    ``poll`` is called about once a second while the child runs; when it returns True the child
    is terminated (a pruned search trial, a stopped comparison). The error line is the child's
    ``adaptkit: error:`` message, or the last line it printed. ``env`` adds variables to this
    process's environment (an executor's GPU and thread settings); ``cwd`` is the child's directory.
    """
    env = dict(os.environ, ADAPTKIT_PROGRESS="1", PYTHONUNBUFFERED="1", **(env or {}))
    log_file.parent.mkdir(parents=True, exist_ok=True)
    tail: list[str] = []
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd)

        def pump() -> None:
            pending = b""
            while chunk := os.read(proc.stdout.fileno(), 65536):
                log.write(chunk)
                log.flush()
                if echo:
                    sys.stderr.buffer.write(chunk)
                    sys.stderr.flush()
                pending += chunk
                *lines, pending = pending.replace(b"\r", b"\n").split(b"\n")
                tail.extend(line.decode(errors="replace") for line in lines if line.strip())
                del tail[:-50]
            if pending.strip():
                tail.append(pending.decode(errors="replace"))

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            while proc.poll() is None:
                time.sleep(0.5)
                if poll is not None and poll():
                    proc.terminate()
                    proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
        reader.join()
    errors = [line for line in tail if line.startswith(ERROR_PREFIX)]
    message = errors[-1][len(ERROR_PREFIX) :].strip() if errors else (tail[-1].strip() if tail else "")
    if proc.returncode < 0:  # killed by a signal: SIGKILL is usually the out-of-memory killer
        message = (
            f"killed by signal {-proc.returncode}"
            + (" (out of memory?)" if proc.returncode == -9 else "")
            + (f"; last output: {message}" if message else "")
        )
    return proc.returncode, message


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The run's ``metrics.jsonl`` entries (a line cut short by a crash is skipped)."""
    path = run_dir / "metrics.jsonl"
    entries = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return entries


def read_examples(run_dir: Path, metric: str, step: int) -> dict[str, Any] | None:
    """The final evaluation's per-example scores of ``metric`` (``{"scores", "index", "keys"}``).

    None when the run kept none for that metric (a loss-only task, an older run) or the file is
    not the final evaluation's (another step: the run did not finish writing it).
    """
    try:
        doc = json.loads((run_dir / EXAMPLES_FILE).read_text())
        scores = doc["scores"][metric]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if doc.get("step") != step or not isinstance(scores, list):
        return None
    return {"scores": scores, "index": doc.get("index"), "keys": doc.get("keys")}


def row_from_run(
    run_dir: Path, variant: str, seed: int, relative_to: Path, error: str | None = None
) -> dict[str, Any]:
    """The report row of one run, from its ``summary.json`` and ``metrics.jsonl``; a failed row without a summary."""
    history = read_metrics(run_dir)
    row: dict[str, Any] = {
        "variant": variant,
        "seed": seed,
        "run_dir": os.path.relpath(run_dir, relative_to),
        "curves": {
            "train": [[h["step"], h["loss"]] for h in history if "loss" in h],
            "eval": [[h["step"], h["eval_loss"]] for h in history if "eval_loss" in h],
        },
    }
    summary_file = run_dir / "summary.json"
    if not summary_file.is_file():
        row.update(status="failed", error=error or "the run did not finish (no summary.json)")
        return row
    s = RunSummary.read(summary_file)
    final = s.final_metrics
    train_loss = s.final_train_loss
    forgetting = s.forgetting or {}
    evaluations = [h for h in history if "eval_loss" in h]
    to_target = time_to_target(evaluations, s.metric, s.greater_is_better) or {}
    final_step = evaluations[-1]["step"] if evaluations else s.steps
    row.update(
        status="finished",
        error=None,
        strategies=s.strategies,
        trainable_parameters=s.trainable_parameters,
        total_parameters=s.total_parameters,
        trainable_percent=100.0 * s.trainable_parameters / max(s.total_parameters, 1),
        peak_memory_mb=s.peak_memory_mb,
        memory_kind=s.memory_kind,
        wall_time_s=s.wall_time_s,
        samples_per_s=s.samples_per_s if s.steps else None,
        tokens_per_s=s.tokens_per_s if s.steps and s.tokens_per_s else None,
        steps=s.steps,
        metric=s.metric,
        greater_is_better=s.greater_is_better,
        final_metric=final.get(s.metric, final.get("eval_loss")),
        best_metric=s.best_metric,
        eval_loss=final.get("eval_loss"),
        train_loss=train_loss,
        overfit_gap=final["eval_loss"] - train_loss
        if train_loss is not None and "eval_loss" in final
        else None,
        forgetting=forgetting.get("value"),
        forgetting_measure=forgetting.get("measure"),
        saved_bytes=s.saved_bytes,
        estimate_skipped=(s.memory_plan or {}).get("estimate_skipped"),
        # the first evaluation within 10% of the final score (report/stats.py: time_to_target)
        steps_to_target=to_target.get("step"),
        tokens_to_target=to_target.get("tokens"),
        seconds_to_target=to_target.get("seconds"),
        examples=read_examples(run_dir, s.metric, final_step),
        # forgetting at every evaluation (forgetting.every_evaluation): the balanced checkpoint
        forgetting_history=[
            {"step": e["step"], "score": e.get(s.metric), "forgetting": e["forgetting"]}
            for e in evaluations
            if "forgetting" in e
        ],
        checkpoint_steps=kept_checkpoint_steps(run_dir),
    )
    return row


def kept_checkpoint_steps(run_dir: Path) -> list[int]:
    """The steps of the checkpoints a run still keeps."""
    return [step_of(path) for path in checkpoint_dirs(run_dir / "checkpoints")]
