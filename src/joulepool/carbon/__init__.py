"""Live grid carbon intensity for the planner: one small client per provider.

Each provider module turns one service's documented response into
:class:`~joulepool.core.energy.IntensityPoint` s in gCO2/kWh
(:mod:`.providers`); :class:`~joulepool.carbon.feed.CarbonFeed` refreshes
every site's source on its interval, keeps the last good data until it is
stale, and resolves an :class:`~joulepool.api.models.EnergyPolicySpec` with
live sources into one the planner takes as it is (static series per site),
plus the per-site status and condition the operator publishes.
"""

from joulepool.carbon.base import RateLimited, Reading, SourceError
from joulepool.carbon.feed import CarbonFeed, ResolvedCarbon

__all__ = ["CarbonFeed", "RateLimited", "Reading", "ResolvedCarbon", "SourceError"]
