"""Settings shared by the whole suite."""

from __future__ import annotations

from hypothesis import settings

# Property tests check behaviour, not speed: hypothesis's default 200 ms deadline per
# example fails them at random on a loaded 2-core CI machine. Speed lives in benchmarks/.
settings.register_profile("joulepool", deadline=None)
settings.load_profile("joulepool")

# No subprocess a test starts outlives this pytest (tests/procguard.py): the kernel stops
# the children of a pytest that dies, SIGTERM runs the fixtures' teardowns, and the session
# stops whatever is left at its end.
from procguard import (  # noqa: E402
    pytest_configure,
    pytest_runtest_setup,
    pytest_sessionfinish,
    pytest_unconfigure,
)

__all__ = ["pytest_configure", "pytest_runtest_setup", "pytest_sessionfinish",
           "pytest_unconfigure"]
