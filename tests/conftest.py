"""Settings shared by the whole suite."""

from __future__ import annotations

from hypothesis import settings

# Property tests check behaviour, not speed: hypothesis's default 200 ms deadline per
# example fails them at random on a loaded 2-core CI machine. Speed lives in benchmarks/.
settings.register_profile("joulepool", deadline=None)
settings.load_profile("joulepool")
