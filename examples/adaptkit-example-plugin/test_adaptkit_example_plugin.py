"""The example plugin's test suite: adaptkit's strategy conformance kit, in one line.

Run it with ``pytest test_adaptkit_example_plugin.py`` (``-m "not distributed"`` skips the
two-process check, which launches two CPU processes with ``accelerate launch``).
"""

from adaptkit.testing import conformance_test

test_bitfit = conformance_test("bitfit")
