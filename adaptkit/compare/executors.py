"""Where a comparison's runs go: child processes on this machine, one or several at a time, or Ray tasks.

An executor starts one run's child command and returns its (exit status, error line); the runner
builds the row from the run directory either way, so skipping finished runs, resuming and failed
rows do not depend on the executor. ``width`` says how many runs it takes at once: with more than
one, ``execute`` runs a comparison in two phases (every variant's first run, with its tuning; then
the rest) and the children's output goes to their log files only.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from adaptkit.compare.child import run_child
from adaptkit.compare.spec import CompareSpec
from adaptkit.errors import AdaptkitError

Poll = Callable[[], bool] | None
#: What ``launch`` returns for a run it did not start because the comparison is being stopped.
STOPPED = (-2, "the comparison was stopped")


class Executor:
    """Runs child commands; ``stop`` (set on an interrupt) ends the ones still running."""

    width = 1

    def __init__(self) -> None:
        self.stop = threading.Event()

    def launch(self, cmd: list[str], log_file: Path, poll: Poll = None) -> tuple[int, str]:
        """Run one child command to its end; return (exit status, error line)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the executor holds (a Ray instance it started)."""

    def polled(self, poll: Poll) -> Callable[[], bool]:
        """``poll``, or True once the comparison is being stopped."""
        return lambda: self.stop.is_set() or bool(poll and poll())

    def run_all(self, calls: list[Callable[[], Any]]) -> list[Any]:
        """Call each of ``calls`` on ``width`` threads; return their results in order.

        Every call runs to its end before the first error (in order) is raised, so that the runs
        that finished are recorded. An interrupt stops the children still running.
        """
        pool = ThreadPoolExecutor(max_workers=max(1, min(self.width, len(calls))))
        futures = [pool.submit(call) for call in calls]
        try:
            wait(futures)
        except KeyboardInterrupt:
            self.stop.set()  # the running children are terminated, no new one starts
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        for future in futures:
            if future.exception() is not None:
                raise future.exception()
        return [future.result() for future in futures]


class LocalExecutor(Executor):
    """Child processes on this machine, ``parallel`` at a time; each pinned to its own GPU where
    there are GPUs, the cores shared out among them (OMP_NUM_THREADS) where there are not."""

    def __init__(self, spec: CompareSpec, echo: bool = True):
        super().__init__()
        self.width = spec.parallel
        self.echo = echo and self.width == 1  # several children at once would interleave their lines
        self.gpus = visible_gpus() if self.width > 1 else []
        if self.gpus and len(self.gpus) < self.width:
            raise AdaptkitError(
                f"compare.parallel: {self.width} runs at once, each on its own GPU, but this machine has "
                f"{len(self.gpus)} GPU(s) visible; lower parallel to {len(self.gpus)}"
            )
        threads = spec.threads_per_run or (max(1, cpu_count() // self.width) if self.width > 1 else None)
        self.env = thread_env(threads)
        self.slots: queue.Queue[int] = queue.Queue()
        for slot in range(self.width):
            self.slots.put(slot)

    def launch(self, cmd: list[str], log_file: Path, poll: Poll = None) -> tuple[int, str]:
        """Run the child in a free slot (its GPU, where there are GPUs)."""
        slot = self.slots.get()
        if self.stop.is_set():
            self.slots.put(slot)
            return STOPPED
        try:
            env = dict(self.env)
            if self.gpus:
                env["CUDA_VISIBLE_DEVICES"] = self.gpus[slot]
            return run_child(cmd, log_file, self.polled(poll), self.echo, env=env)
        finally:
            self.slots.put(slot)


def thread_env(threads: int | None) -> dict[str, str]:
    """The environment that sets a child's CPU threads (torch reads OMP_NUM_THREADS); none for None.

    Results depend on the thread count bit for bit (a matrix product summed in other chunks), so
    each executor names it explicitly rather than inheriting whatever the process it runs in has.
    """
    return {} if threads is None else {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def cpu_count() -> int:
    """The cores this process may use (its affinity where the platform tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def visible_gpus() -> list[str]:
    """The ids to give CUDA_VISIBLE_DEVICES, one per GPU this process may use."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch
    except ImportError:
        return []
    # device_count asks NVML where it can, without starting CUDA in this process
    return [str(i) for i in range(torch.cuda.device_count())]
