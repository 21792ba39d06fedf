"""The node agent credits each period's GPU energy and tokens to pools (PoolMeter)."""

from __future__ import annotations

import pytest
from test_nodeagent_agent import Rig

from joulepool.api.models import EnergyPolicy
from joulepool.core.energy import J_PER_KWH
from joulepool.core.profiles import H100_8B


async def test_pool_energy_and_tokens_add_up_to_what_the_agent_metered():
    rig = Rig(count=3)
    await rig.agent.start()
    chat = rig.engine([0, 1], batch=8)  # one engine over two GPUs; GPU 2 idle
    seen: list[float] = []
    read = chat.reading

    def recorded(dt: float):  # the tokens the engine reported, period by period
        r = read(dt)
        seen.append(r.tokens)
        return r

    chat.reading = recorded  # type: ignore[method-assign]
    await rig.ticks(10)
    work = {"pool": "unknown", "model": H100_8B.model, "site": ""}
    pool_j = rig.metric("joulepool_pool_energy_joules_total", **work)
    tokens = rig.metric("joulepool_pool_output_tokens_total", **work)
    gpu_j = [rig.metric("joulepool_gpu_energy_joules_total", gpu=str(i), product="H100",
                        node="n1") for i in range(3)]
    idle = rig.metric("joulepool_gpu_idle_energy_joules_total", site="")
    assert pool_j == pytest.approx(gpu_j[0] + gpu_j[1])  # both GPUs of the engine
    assert idle == pytest.approx(gpu_j[2])  # nobody's
    # tokens counted once per engine, not once per GPU it spans
    assert len(seen) == 10 and tokens == pytest.approx(sum(seen))
    assert rig.metric("joulepool_gpu_engines", gpu="0", product="H100", node="n1") == 1
    assert rig.metric("joulepool_gpu_engines", gpu="2", product="H100", node="n1") == 0
    # no intensity known: grams stay 0
    assert rig.metric("joulepool_pool_carbon_grams_total", **work) == 0


def test_site_intensity_comes_from_the_spec_or_the_operators_status():
    policy = EnergyPolicy.model_validate({
        "metadata": {"name": "default"},
        "spec": {"carbon": [
            {"site": "east", "series": [120, 300]},
            {"site": "west", "source": {"provider": "configMap", "configMap": {"name": "c"}}},
            {"site": "north", "source": {"provider": "configMap", "configMap": {"name": "n"}}},
        ]},
        "status": {"carbon": [
            {"site": "west", "provider": "configMap", "signal": "average", "gramsPerKWh": 80},
            {"site": "north", "provider": "configMap", "signal": "average", "stale": True},
        ]}})
    assert policy.site_intensities() == {"east": 120, "west": 80}


async def test_pool_carbon_uses_the_sites_intensity():
    class Policy:
        async def refresh(self) -> None: ...

        def miad(self) -> None:
            return None

        def carbon(self, site: str) -> float | None:
            return {"east": 360.0}.get(site)

    rig = Rig(count=1)
    rig.agent.policy = Policy()
    from joulepool.api.plan import PlanDocument, PlannedNode

    doc = PlanDocument(nodes={"n1": PlannedNode(site="east", product="H100", gpus=1)})
    rig.agent.plan.current = lambda: doc  # type: ignore[method-assign]
    await rig.agent.start()
    rig.engine([0], batch=4)
    await rig.ticks(5)
    work = {"pool": "unknown", "model": H100_8B.model, "site": "east"}
    joules = rig.metric("joulepool_pool_energy_joules_total", **work)
    grams = rig.metric("joulepool_pool_carbon_grams_total", **work)
    assert joules > 0 and grams == pytest.approx(joules / J_PER_KWH * 360.0)
