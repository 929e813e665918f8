"""``compare.executor: ray``: every run of a comparison is a Ray task with its own resources.

The task runs the same child command as the local executor (``run_child``, which writes the
run's log file) on whichever node Ray places it, and returns (exit status, error line); the
driver builds the rows from the run directories, exactly as it does locally. The paths are the
driver's, so on a cluster the comparison directory (and the data) must be on storage every node
sees at the same path. Ray is imported only here, and only when a comparison asks for it.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from adaptkit.compare.executors import STOPPED, Executor, Poll, thread_env
from adaptkit.compare.spec import CompareSpec, RaySpec
from adaptkit.errors import AdaptkitError

INSTALL = "pip install 'adaptkit[ray]'"


def import_ray() -> Any:
    """The ``ray`` module, or one message saying how to install it."""
    try:
        import ray
    except ImportError:
        raise AdaptkitError(f"compare.executor: ray needs Ray, which is not installed; {INSTALL}") from None
    return ray


def child_task(args: list[str], log_file: str, env: dict[str, str], cwd: str) -> tuple[int, str]:
    """The body of a run's Ray task: the child command with this worker's Python, in the driver's directory.

    Ray has set CUDA_VISIBLE_DEVICES for a task that claims GPUs; the child inherits it.
    """
    from adaptkit.compare.child import run_child

    return run_child([sys.executable, *args], Path(log_file), None, False, env=env, cwd=cwd)


class RayExecutor(Executor):
    """Runs each child command as a Ray task claiming ``cpus_per_run`` CPUs and ``gpus_per_run`` GPUs."""

    def __init__(self, spec: CompareSpec):
        super().__init__()
        self.ray = import_ray()
        self.settings = spec.ray or RaySpec()
        self.started = not self.ray.is_initialized()
        if self.started:
            address = self.settings.address or "local"  # "local": a new instance, never a stray one
            self.ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
        self.width = self._capacity()
        threads = spec.threads_per_run or max(1, int(self.settings.cpus_per_run))
        self.env = thread_env(threads)
        # no retries: a run that crashed or was killed for memory is a failed row, not a silent rerun
        self.task = self.ray.remote(max_retries=0)(child_task).options(
            num_cpus=self.settings.cpus_per_run, num_gpus=self.settings.gpus_per_run
        )

    def _capacity(self) -> int:
        """How many runs the cluster holds at once now (the driver's threads and its time estimate)."""
        total = self.ray.cluster_resources()
        fits = [int(total.get("CPU", 0) // self.settings.cpus_per_run)]
        if self.settings.gpus_per_run:
            fits.append(int(total.get("GPU", 0) // self.settings.gpus_per_run))
        if min(fits) == 0:
            message = (
                f"compare.ray: a run claims {self.settings.cpus_per_run:g} CPU and "
                f"{self.settings.gpus_per_run:g} GPU, but the Ray cluster has {total.get('CPU', 0):g} CPU "
                f"and {total.get('GPU', 0):g} GPU"
            )
            if self.started and not self.settings.address:  # a local instance will not grow
                self.close()
                raise AdaptkitError(message)
            logging.getLogger("adaptkit").warning("%s; the runs wait for the cluster to grow", message)
        return max(1, min(fits))

    def launch(self, cmd: list[str], log_file: Path, poll: Poll = None) -> tuple[int, str]:
        """Run the child as a Ray task and wait for it; a pruned or stopped run is cancelled."""
        ray = self.ray
        if self.stop.is_set():
            return STOPPED
        ref = self.task.remote(cmd[1:], str(Path(log_file).absolute()), self.env, os.getcwd())
        polled, cancelled = self.polled(poll), False
        while not ray.wait([ref], timeout=0.5)[0]:
            if not cancelled and polled():
                ray.cancel(ref)  # a KeyboardInterrupt in the task: run_child terminates the child
                cancelled = True
        try:
            return ray.get(ref)
        except ray.exceptions.TaskCancelledError:
            return -15, "stopped"
        except ray.exceptions.RayError as exc:  # the worker died (killed for memory, a lost node)
            cause = getattr(exc, "cause", None)  # an exception raised inside the task itself
            lines = str(cause or exc).strip().splitlines()
            return 1, f"the Ray task failed: {lines[0] if lines else type(exc).__name__}"

    def close(self) -> None:
        """Stop the Ray instance if this executor started it."""
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()
