"""A small seeded operator chaos run in ``make test`` (the larger one:
``joulepool bench operator_chaos``); see operator_chaos.py for faults and oracle."""

from __future__ import annotations

import pytest
from operator_chaos import run_chaos


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_chaos_run_loses_no_update(seed: int) -> None:
    result = await run_chaos(seed, actions=15, rate=0.15, converge_timeout=45.0)
    assert result.faults_injected > 0 and result.actions == 15
    assert not result.lost_updates, (result.seed, dict(result.faults), result.lost_updates)
