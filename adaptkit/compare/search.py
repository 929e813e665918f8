"""Hyperparameter search for a comparison variant: Optuna's TPE sampler with median pruning.

Each trial is an ordinary run in its own process. While it runs, its evaluations are read from
its ``metrics.jsonl`` and reported to Optuna; a trial the pruner judges hopeless is stopped.
The study lives in ``<comparison>/search.db`` (SQLite) or the storage ``search.storage`` names,
so an interrupted search goes on where it stopped when the comparison is run again. With
``search.workers`` above one, that many trials of the study run at once (Optuna's threads, each
trial a child run through the comparison's executor); a database server as the storage suits
many workers better than SQLite, which serialises every write.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptkit.compare.child import read_metrics

if TYPE_CHECKING:
    from adaptkit.compare.runner import Runner
    from adaptkit.compare.spec import Job, Search


def suggest(trial: Any, space: dict[str, Any]) -> dict[str, Any]:
    """Draw one value per dimension of the search space."""
    params = {}
    for key, p in space.items():
        if p.choices is not None:
            params[key] = trial.suggest_categorical(key, p.choices)
        elif p.integer:
            params[key] = trial.suggest_int(key, int(p.low), int(p.high), log=p.log)
        else:
            params[key] = trial.suggest_float(key, p.low, p.high, log=p.log)
    return params


def optimise(
    runner: Runner, job: Job, search: Search
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """Run the search for one variant; return (best parameters, best trial's row, all trials)."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    root = runner.plan.root
    root.mkdir(parents=True, exist_ok=True)
    from adaptkit.recipe.schema import TrainSpec
    from adaptkit.train.evaluate import selection_metric

    task = runner.plan.host.lookup("tasks", job.raw["model"].get("task", "classification")).obj
    train = TrainSpec(
        **{**job.raw.get("train", {}), "metric": search.metric or job.raw.get("train", {}).get("metric")}
    )
    metric, greater = selection_metric(train, task)
    extra = {"train.metric": search.metric} if search.metric else {}
    study = optuna.create_study(
        study_name=job.key,
        storage=search.storage or f"sqlite:///{(root / 'search.db').resolve()}",
        load_if_exists=True,
        direction=search.direction or ("maximize" if greater else "minimize"),
        sampler=optuna.samplers.TPESampler(seed=job.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
        if search.pruning
        else optuna.pruners.NopPruner(),
    )
    rows: dict[int, dict[str, Any]] = {}

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, search.space)
        run_dir = root / "runs" / f"{job.key}-trial{trial.number}"
        seen: set[int] = set()
        pruned = []

        def poll() -> bool:
            for entry in read_metrics(run_dir):
                if entry.get("step") in seen or metric not in entry:
                    continue
                seen.add(entry["step"])
                trial.report(entry[metric], entry["step"])
                if trial.should_prune():
                    pruned.append(entry["step"])
                    return True
            return False

        row = runner.run(job, f"-trial{trial.number}", {**params, **extra}, poll if search.pruning else None)
        rows[trial.number] = row
        if pruned:
            runner.log(f"{job.key}-trial{trial.number}: pruned at step {pruned[0]}")
            raise optuna.TrialPruned()
        if row["status"] != "finished":
            raise RuntimeError(row["error"])
        return row["best_metric"]

    finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    remaining = search.trials - len(study.get_trials(deepcopy=False, states=finished))
    if remaining > 0:  # n_jobs: that many trials at once, each on a thread of its own
        study.optimize(objective, n_trials=remaining, n_jobs=search.workers, catch=(RuntimeError,))
    trials = [
        {"number": t.number, "params": t.params, "value": t.value, "state": t.state.name}
        for t in study.trials
    ]
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if not done:
        from adaptkit.errors import AdaptkitError

        raise AdaptkitError(f"search for '{job.variant}': no trial finished; see the logs in {root / 'logs'}")
    best = study.best_trial
    best_row = rows.get(best.number)
    if best_row is None:  # finished in an earlier invocation: its row comes back from its directory
        from adaptkit.compare.child import row_from_run

        best_row = row_from_run(
            Path(root / "runs" / f"{job.key}-trial{best.number}"), job.variant, job.seed, root
        )
    return {**best.params, **extra}, best_row, trials
