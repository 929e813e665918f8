"""An adaptkit plugin that records when each optimizer step ends and the peak memory at that time.

The benchmarks load it with ``get_plugin_host(["_steptimes"])``, the same way ``adaptkit -p`` does:
timing goes through adaptkit's public hook, not through its internals.
"""

from __future__ import annotations

import resource
import time

from adaptkit import hookimpl

#: (step, perf_counter seconds, peak resident set in MiB, CPU seconds of the process) after every optimizer step.
STEPS: list[tuple[int, float, float, float]] = []


@hookimpl
def adaptkit_on_step_end(step):
    usage = resource.getrusage(resource.RUSAGE_SELF)
    STEPS.append((step, time.perf_counter(), usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime))
