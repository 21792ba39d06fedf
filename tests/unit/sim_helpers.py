"""Small clusters and hand-made workloads for the simulator tests."""

from __future__ import annotations

import numpy as np

from joulepool.core.classes import CLASS_NAMES, ClassBoundaries, freesh_slo
from joulepool.core.planner import PlanNode
from joulepool.sim.cluster import SimCluster
from joulepool.sim.engine import RunResult, simulate
from joulepool.sim.policies import POLICIES
from joulepool.sim.runner import model_tables
from joulepool.sim.workload import Workload


def cluster(nodes: list[tuple[str, str, int]], model: str = "llama-3.1-8b",
            static: dict[str, int] | None = None, plan_modes: tuple[str, ...] | None = None,
            carbon: float = 400.0, site: str = "s1") -> SimCluster:
    """nodes: (name, product, gpus) on one site."""
    products = {p for _, p, _ in nodes}
    return SimCluster(
        name="test",
        model=model,
        nodes=tuple(PlanNode(n, site, p, g) for n, p, g in nodes),
        carbon_g_per_kwh={site: (carbon,)},
        carbon_step_s=300.0,
        static_modes=static or dict.fromkeys(products, 1),
        plan_modes=plan_modes or tuple(f"1x{p}" for p in sorted(products)),
        objective="energy",
        duration_s=60.0,
    )


def workload(arrival: list[float], inp: list[int], out: list[int], duration: float,
             bulk: list[bool] | None = None) -> Workload:
    """Exact requests, no predictor noise, FREESH SLOs by class."""
    n = len(arrival)
    a = np.asarray(arrival, dtype=np.float64)
    i = np.asarray(inp, dtype=np.int64)
    o = np.asarray(out, dtype=np.int64)
    cls = ClassBoundaries().classify_many(i, o).astype(np.int64)
    ttft = np.array([freesh_slo(CLASS_NAMES[c]).ttft_s for c in cls], dtype=np.float64)
    tpot = np.full(n, 0.15)
    return Workload(
        arrival_s=a,
        input_tokens=i,
        output_tokens=o,
        predicted_tokens=o.copy(),
        category=np.zeros(n, dtype=np.int64),
        bulk=np.asarray(bulk if bulk is not None else [False] * n, dtype=np.bool_),
        cls=cls,
        ttft_slo_s=ttft,
        tpot_slo_s=tpot,
        deadline_s=ttft + o * tpot,
        duration_s=duration,
        scale=1.0,
    )


def one_instance_run(product: str, gpus: int, arrival: np.ndarray, inp: np.ndarray,
                     out: np.ndarray, ttft: float, tpot: float, instances: int = 1,
                     policy: str = "least-loaded") -> tuple[RunResult, np.ndarray]:
    """One instance of ``product`` x ``gpus`` serving every request (least-loaded, one
    class, interactive, TTFT ``ttft`` s and TPOT ``tpot`` s each; deadline TTFT plus ten
    TPOTs per output token): the run and the mask of requests past its first 5 % of
    arrival time (the empty start left out). ``instances`` > 1: a pool of that many on
    one node, routed by ``policy`` (a static one)."""
    n = arrival.size
    wl = Workload(
        arrival_s=arrival, input_tokens=inp, output_tokens=out, predicted_tokens=out.copy(),
        category=np.zeros(n, dtype=np.int64), bulk=np.zeros(n, dtype=np.bool_),
        cls=np.zeros(n, dtype=np.int64), ttft_slo_s=np.full(n, ttft),
        tpot_slo_s=np.full(n, tpot), deadline_s=ttft + out * tpot * 10.0,
        duration_s=float(arrival[-1]), scale=1.0)
    one = cluster([("n", product, gpus * instances)], static={product: gpus})
    run = simulate(one, wl, POLICIES[policy], model_tables(one))
    return run, arrival > 0.05 * arrival[-1]
