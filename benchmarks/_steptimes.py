"""An adaptkit plugin that records when each optimizer step ends, the peak memory at that time and the step's loss.

The benchmarks load it with ``get_plugin_host(["_steptimes"])``, the same way ``adaptkit -p`` does:
timing goes through adaptkit's public hook, not through its internals. It records what the
hand-written loop records after its steps (``_common.stamp``).
"""

from __future__ import annotations

from _common import stamp

from adaptkit import hookimpl

#: (step, perf_counter seconds, peak memory in MiB, CPU seconds of the process) after every optimizer step.
STEPS: list[tuple[int, float, float, float]] = []
#: The training loss of every optimizer step, as the loop logged it.
LOSSES: list[float] = []
#: A one-element list a benchmark may set and keep counting into (vs_trl.py: supervised tokens);
#: its value after every optimizer step goes to ``COUNTS``.
COUNTER: list[int] = [0]
COUNTS: list[int] = []


@hookimpl
def adaptkit_on_step_end(step, logs):
    STEPS.append(stamp(step))
    LOSSES.append(logs["loss"])
    COUNTS.append(COUNTER[0])
