"""``sim.runner`` with worker processes (``Experiment.jobs`` > 1): the results of one
process, from workers that start clean rather than as forks of a parent whose other
threads may hold locks (a forked child inherits such a lock held, with no thread left
to release it, and waits for ever)."""

from __future__ import annotations

import operator
import threading

import numpy as np
import pytest
from sim_helpers import cluster

import joulepool
from joulepool.sim import runner
from joulepool.sim.runner import Experiment, ExperimentResult, WorkerStartError, run_experiment
from joulepool.sim.trace import load_trace
from joulepool.workers import require_parent_package

#: generous: two tiny runs take about a second; a loaded 2-core machine, many times that
DEADLINE_S = 240.0


def _experiment(jobs: int) -> Experiment:
    return Experiment(cluster=cluster([("h", "H100", 2), ("a", "A100", 2)]), trace=load_trace(),
                      duration_s=30.0, arrival_mode="load", arrival_value=0.5,
                      policies=("round-robin", "miad-only"), seed=3, jobs=jobs)


def _same_runs(a: ExperimentResult, b: ExperimentResult) -> None:
    assert set(a.runs) == set(b.runs) == {"round-robin", "miad-only"}
    for policy in a.runs:
        (x,), (y,) = a.runs[policy], b.runs[policy]
        np.testing.assert_array_equal(x.gpu_energy_j, y.gpu_energy_j)
        np.testing.assert_array_equal(x.t_first, y.t_first)
        np.testing.assert_array_equal(x.t_done, y.t_done)
        assert x.carbon_g == y.carbon_g and x.work_floor == y.work_floor


def test_workers_are_not_stalled_by_a_lock_another_parent_thread_holds(monkeypatch):
    """Another thread of this process holds a lock for the whole run, and the floor the
    workers compute after each run is patched here to take it: a forked worker would run
    that patched copy and wait on the lock, inherited held, for ever. Workers that
    import the simulator afresh run its own floor, finish, and match one process."""
    alone = run_experiment(_experiment(jobs=1))
    lock, done = threading.Lock(), threading.Event()
    taken = threading.Event()

    def hold() -> None:
        with lock:
            taken.set()
            done.wait()

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert taken.wait(DEADLINE_S)
    real_floor = runner.window_work_floor

    def floor_under_the_lock(*args: object) -> object:
        with lock:
            return real_floor(*args)

    monkeypatch.setattr(runner, "window_work_floor", floor_under_the_lock)
    result: list[ExperimentResult] = []
    worker = threading.Thread(target=lambda: result.append(run_experiment(_experiment(jobs=2))),
                              daemon=True)
    try:
        worker.start()
        worker.join(DEADLINE_S)
        assert not worker.is_alive(), f"the pool's runs did not finish in {DEADLINE_S:g} s"
    finally:
        done.set()
    _same_runs(result[0], alone)


class _FailsToUnpickle:
    """Pickles in the parent; unpickling it (in a worker, as the pool starts it) raises,
    as an object of a module missing from the worker's path would."""

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return operator.truediv, (1, 0)


def test_a_worker_that_cannot_start_raises_rather_than_hanging():
    """Every worker fails while starting (unpickling the experiment's inputs): the run
    raises WorkerStartError, instead of the pool starting new workers for ever."""
    exp = _experiment(jobs=2)
    tasks = [(p, 0) for p in exp.policies]
    runs: dict[str, list[object]] = {p: [None] for p in exp.policies}
    poisoned = ({"x": _FailsToUnpickle()}, None, [])
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            runner._run_in_pool(exp, tasks, runs, 2, poisoned, None, None)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(DEADLINE_S)
    assert not worker.is_alive(), f"the pool did not give up in {DEADLINE_S:g} s"
    assert isinstance(outcome[0], WorkerStartError), outcome


def test_workers_running_another_joulepool_stop_the_run(monkeypatch, tmp_path):
    """The parent's joulepool is said to come from elsewhere (as when a script puts
    another checkout's src on sys.path at run time): the workers, which import the fork
    server's joulepool, refuse to run instead of mixing two versions of the code."""
    monkeypatch.setattr(joulepool, "__file__", str(tmp_path / "joulepool" / "__init__.py"))
    with pytest.raises(WorkerStartError):
        run_experiment(_experiment(jobs=2))


def test_the_same_package_passes_the_check():
    require_parent_package(joulepool.__file__ or "")
    with pytest.raises(RuntimeError, match="imported joulepool from"):
        require_parent_package("/elsewhere/joulepool/__init__.py")


class _PoolWhoseWorkerFailed:
    """What a ProcessPoolExecutor does when a worker has already failed to start while
    tasks are still being submitted: its first submit goes through, the next one tries
    to start a worker through the fork server that the failure closed (OSError, as
    seen: EBADF from ``sendfds``)."""

    def __init__(self) -> None:
        self.submitted: list[int] = []

    def submit(self, fn, item):
        if self.submitted:
            raise OSError(9, "Bad file descriptor")
        self.submitted.append(item)
        return fn(item)


def test_a_worker_failing_while_tasks_are_submitted_is_a_broken_pool():
    """submit_all turns the OSError of starting a worker through a closed fork server
    into BrokenProcessPool, which run_experiment reports as WorkerStartError, instead
    of letting it escape as a bare OSError (seen once in a full `make test`)."""
    from concurrent.futures.process import BrokenProcessPool

    from joulepool.workers import submit_all

    pool = _PoolWhoseWorkerFailed()
    with pytest.raises(BrokenProcessPool, match=r"could not be started.*Bad file descriptor"):
        submit_all(pool, operator.neg, [1, 2, 3])
    assert pool.submitted == [1]
    assert submit_all(_PoolOfOne(), operator.neg, [1, 2]) == [-1, -2]


class _PoolOfOne:
    def submit(self, fn, item):
        return fn(item)
