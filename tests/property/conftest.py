"""Hypothesis settings profiles for the property tests.

Pick one with the environment variable HYPOTHESIS_PROFILE (default "dev"):

- dev:   50 examples per test, for the edit-test loop.
- ci:    150 examples, derandomized (the same examples on every run, so CI is
         reproducible) and printing the reproduction blob of a failure.
- fuzz:  2,000 examples, new ones on every run (`make fuzz`: the fuzz
         targets of test_fuzz_decoders.py, longer).
- debug: verbose output of every example tried.

No deadline in any profile: torch's first call of an operator can take far
longer than hypothesis' 200 ms default, which would make tests flaky; hangs are
caught by pytest-timeout instead (the global timeout in pyproject.toml).

Shared strategies live in `property_strategies.py` beside this file. Test
directories have no __init__.py, so pytest's default "prepend" import mode puts
this directory on sys.path and test modules import it as a top-level module.
Its name is deliberately specific so it cannot collide with a module of the
same name in another test directory.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import Verbosity, settings

settings.register_profile("dev", max_examples=50, deadline=None)
settings.register_profile(
    "ci", max_examples=150, deadline=None, derandomize=True, print_blob=True,
)
settings.register_profile("fuzz", max_examples=2000, deadline=None, print_blob=True)
settings.register_profile("debug", max_examples=50, deadline=None, verbosity=Verbosity.verbose)


def pytest_configure(config: pytest.Config) -> None:
    # An explicit --hypothesis-profile on the command line wins over the
    # environment; otherwise HYPOTHESIS_PROFILE, then "dev".
    if config.getoption("hypothesis_profile", default=None) is None:
        settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or "dev")
