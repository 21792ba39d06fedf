"""Fixtures of the chart tests; the rendering itself is in chartlib.py."""

from __future__ import annotations

import sys
from pathlib import Path

# the helper module next to this file, importable under any --import-mode
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest
from chartlib import VALUE_SETS, Rendered, rendered


@pytest.fixture(scope="session", params=sorted(VALUE_SETS))
def any_render(request: pytest.FixtureRequest) -> Rendered:
    """Each values set in turn."""
    return rendered(request.param)


@pytest.fixture(scope="session")
def default_render() -> Rendered:
    return rendered("default")
