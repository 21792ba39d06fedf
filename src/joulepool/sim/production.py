"""The deployed request router, driven by the simulator (the ``joulesched-router`` policy).

The simulator's ``joulesched`` policy scores instances with core's
``joulesched`` routing profile (:mod:`joulepool.core.scoring`) from the
simulator's exact state. ``joulesched-router`` instead puts the routing
service's own state machine, :class:`joulepool.core.router.PoolRouter`, in the
loop, unchanged and with its production defaults
(:class:`~joulepool.core.router.RouterConfig`, the service's defaults too):
every arrival is a ``decide`` call, every completion a ``report`` (request id,
deadline met), exactly what the service's ``/v1/route`` and ``/v1/complete``
call with the HTTP body's fields; the router ticks
every simulated second as the routing service does, and every ``scrape_every_s`` it
reads each engine's waiting and running counts as the routing service scrapes
vLLM's metrics. So it evaluates the router's own inputs: its ledger of routed
tokens, its learned mean prompt and response, its PI step every 50 completions
or 10 s. Completion reports carry no joules (the simulator's profiles are the
truth, so the online eps scale has nothing to correct).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

from joulepool.core.classes import Tier
from joulepool.core.controllers import MIADController, miad_step_target_s
from joulepool.core.profiles import ServingProfile
from joulepool.core.router import Endpoint, PoolRouter, RouterConfig
from joulepool.core.routing import EndpointModel

POOL = "sim/default"
#: the routing service's default scrape interval (``Settings.scrape_interval_seconds``)
SCRAPE_EVERY_S = 2.0


class ProductionRouter:
    """One production router pool over the simulator's static instances."""

    def __init__(
        self,
        members: Sequence[tuple[int, str, ServingProfile]],
        ttft_s: float,
        tpot_s: float,
        settings: RouterConfig | None = None,
        scrape_every_s: float = SCRAPE_EVERY_S,
        mean_tokens: tuple[float, float] | None = None,
        sites: Sequence[str] | None = None,
        clock_follows_load: bool = True,
        miad_margin: float = MIADController.margin,
        pool_room: bool = False,
    ) -> None:
        """``members``: (instance index, node, serving profile) of each instance;
        ``mean_tokens`` (prompt, response) sizes each endpoint's b*_n (core.routing);
        ``sites``: each member's site, for :meth:`set_site_intensities`;
        ``clock_follows_load``: the GPUs' clocks follow their load (MIAD), so X(b) is read
        at the clock each batch needs, as the routing service reads it
        (``kube.pools.Router.endpoint_model``: the node agents steer every GPU); False
        for GPUs locked at f_max; ``miad_margin``: MIAD's margin, which sets the step it
        holds (core.controllers.miad_step_target_s); ``pool_room``: each endpoint's b*_n
        as one of its profile's endpoints in the pool (an M/G/n prefill queue), else
        alone (EngineParams.pool_room)."""
        self.pool = PoolRouter(POOL, settings or RouterConfig())
        self.pool.ttft_s, self.pool.tpot_s = float(ttft_s), float(tpot_s)
        models: dict[int, EndpointModel] = {}
        endpoints: list[Endpoint] = []
        # each profile's endpoints are one pool of that size (core.routing's b*_n)
        pool_size = Counter(id(profile) for _, _, profile in members if pool_room)
        self.instance_of: dict[str, int] = {}
        for k, (idx, node, profile) in enumerate(members):
            key = id(profile)
            if key not in models:
                serving = None if mean_tokens is None else (*mean_tokens, float(ttft_s))
                target = (miad_step_target_s(tpot_s, miad_margin) if clock_follows_load
                          else None)
                models[key] = EndpointModel.from_profile(profile, tpot_s, serving=serving,
                                                         step_target_s=target,
                                                         pool_size=max(pool_size[key], 1))
            address = f"i{idx:06d}"  # sorts as the instances do: ties go the same way
            endpoints.append(Endpoint(address, models[key], node,
                                      eps_half_life_s=self.pool.s.eps_half_life_s,
                                      eps_min_tokens=self.pool.s.eps_min_tokens,
                                      site=sites[k] if sites is not None else ""))
            self.instance_of[address] = idx
        self.pool.set_endpoints(endpoints)
        self.scrape_every_s = scrape_every_s
        self.next_scrape = 0.0
        self.routed: dict[int, tuple[str, str]] = {}  # simulator request -> (address, id)

    def set_site_intensities(self, g_per_kwh: dict[str, float] | None) -> None:
        """Grid intensity per site now, on a carbon-objective cluster (the routing
        service's EnergyPolicy poll: core.router.PoolRouter.set_site_intensities)."""
        self.pool.set_site_intensities(g_per_kwh)

    @property
    def lam(self) -> float:
        return self.pool.pi.lam

    def route(self, rid: int, input_tokens: float, output_tokens: float, deadline_s: float,
              bulk: bool, now: float) -> int:
        """Route simulator request ``rid``; returns the chosen instance's index."""
        # the service's /v1/route calls decide() with the body's fields
        d = self.pool.decide(float(output_tokens), float(input_tokens),
                             Tier.BULK if bulk else Tier.INTERACTIVE, float(deadline_s), now)
        self.routed[rid] = (d.endpoint, d.request_id)
        return self.instance_of[d.endpoint]

    def complete(self, rid: int, output_tokens: float, met: bool, now: float) -> None:
        address, request_id = self.routed.pop(rid)
        # the service's /v1/complete calls report() with the body's fields
        self.pool.report(address, request_id, float(output_tokens), met, None, now)

    def release(self, rid: int) -> None:
        """Simulator request ``rid`` was refused by its engine: the proxy forgets it
        (no outcome to learn from)."""
        address, request_id = self.routed.pop(rid)
        self.pool.release(address, request_id)

    def tick(self, now: float, counts: Callable[[int], tuple[float, float]]) -> None:
        """The routing service's 1 s housekeeping, and a scrape when one is due:
        ``counts(instance)`` gives (waiting, running) as vLLM's metrics would."""
        self.pool.tick(now)
        if now >= self.next_scrape:
            self.next_scrape = now + self.scrape_every_s
            for address, idx in self.instance_of.items():
                waiting, running = counts(idx)
                self.pool.apply_scrape(address, waiting, running, now)
