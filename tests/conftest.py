"""Shared test set-up: the hypothesis profiles.

``ci`` (loaded by default) is deterministic: every run tries the same examples, so a red
CI run reproduces on any machine, and no example database is written. It has no deadline,
since CPU time varies with the machine and the load (the suites run on two workers).
Tests keep their own ``@settings(max_examples=...)``: a profile only fills in what a test
leaves out.

``dev`` explores: new random examples on every run, remembered in ``.hypothesis/`` when
they fail. Pick a profile with ``HYPOTHESIS_PROFILE=dev python -m pytest ...``.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", deadline=None, derandomize=True, database=None, print_blob=True)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
