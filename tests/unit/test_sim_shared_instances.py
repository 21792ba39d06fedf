"""The simulator runs the planner's shared instances (the matrix's low-load cells, small):
two classes whose demand is a few per cent of an instance share one instance, which serves
both classes' requests within their SLOs; with instances of their own, each class holds a
GPU."""

from __future__ import annotations

import numpy as np
import pytest
from sim_helpers import cluster, workload

from joulepool.core.classes import CLASS_NAMES
from joulepool.sim.engine import simulate
from joulepool.sim.planning import plan_windows
from joulepool.sim.policies import POLICIES
from joulepool.sim.runner import model_tables


def _two_classes(duration: float = 300.0):
    """SS (200 in, 50 out) and LS (2,000 in, 50 out) requests, one every 3 s each."""
    t = np.arange(0.0, duration - 5.0, 3.0)
    arrival = np.sort(np.concatenate([t, t + 1.5]))
    inp = np.where(np.isin(arrival, t), 200, 2000)
    n = arrival.size
    return workload(arrival.tolist(), inp.tolist(), [50] * n, duration=duration)


@pytest.mark.parametrize("policy", ["combined", "freesh"])
def test_two_small_classes_share_one_instance_and_meet_their_slos(policy: str) -> None:
    cl = cluster([("h", "H100", 2)])
    wl = _two_classes()
    ss, ls = CLASS_NAMES.index("SS"), CLASS_NAMES.index("LS")
    assert {int(c) for c in np.unique(wl.cls)} == {ss, ls}
    (shared,) = plan_windows(cl, wl)
    assert shared.feasible
    (inst,) = shared.instances
    assert inst.count == 1 and set(inst.serves) == {ss, ls}
    (alone,) = plan_windows(cl, wl, share_instances=False)
    assert sorted(pi.cls for pi in alone.instances) == [ss, ls]

    tables = model_tables(cl)
    run = simulate(cl, wl, POLICIES[policy], tables, [shared])
    busy = np.asarray(run.gpu_busy_s)
    assert (busy > 0).sum() == 1  # one GPU served every request of both classes
    assert np.isfinite(run.t_done).all()  # none starved
    assert np.all(run.t_first - wl.arrival_s <= wl.ttft_slo_s)
    assert np.all(run.t_done - wl.arrival_s <= wl.deadline_s)

    own = simulate(cl, wl, POLICIES[policy], tables, [alone])
    assert (np.asarray(own.gpu_busy_s) > 0).sum() == 2


def test_no_share_instances_gives_every_class_instances_of_its_own() -> None:
    """``joulepool simulate --no-share-instances`` reaches the planner (FREESH's
    formulation, the comparison in docs/marginal-energy.md)."""
    import argparse

    from joulepool.sim import cli
    from joulepool.sim.runner import Experiment, run_experiment
    from joulepool.sim.trace import load_trace

    parser = argparse.ArgumentParser()
    cli.configure(parser)
    assert cli._experiment(parser.parse_args([])).share_instances is True
    assert cli._experiment(parser.parse_args(["--no-share-instances"])).share_instances is False
    cl = cluster([("h", "H100", 8)])
    served: dict[bool, list[int]] = {}
    for share in (True, False):
        exp = Experiment(cl, load_trace(), 60.0, arrival_mode="rate", arrival_value=0.3,
                         policies=("freesh",), share_instances=share)
        (plan,) = run_experiment(exp).repeats[0].plans
        served[share] = [len(pi.serves) for pi in plan.instances]
    assert max(served[True]) > 1  # at 0.3 req/s the classes share
    assert served[False] and max(served[False]) == 0  # every instance one class's
