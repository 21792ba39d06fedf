"""The e2e scenario's own assumptions, checked without a cluster: the pool it
applies is valid, and the metric names it waits for are the node agent's."""

from __future__ import annotations

import pytest
from e2elib import metric_sum, pool_manifest

from joulepool.api.load import parse_resource
from joulepool.api.plan import pool_key


def test_the_e2e_pool_is_valid() -> None:
    pool = parse_resource(pool_manifest("jp-e2e-abcdef", "e2e"))
    assert len(pool_key("jp-e2e-abcdef", "e2e")) <= 63  # fits the pool label
    assert pool.spec.template["spec"]["containers"][0]["args"][0] == "fake-engine"  # type: ignore[attr-defined]


def test_metric_names_are_the_node_agents() -> None:
    metrics = pytest.importorskip("joulepool.nodeagent.metrics",
                                  reason="the node agent is not in this build")
    m = metrics.AgentMetrics("node-a")
    labels = m.gpu(0, "H100")
    m.decisions.labels(*labels, "down").inc(3)
    m.gpu_samples = lambda: [metrics.GPUSample(
        ("0", "GPU-1", "NVIDIA H100 80GB HBM3", "H100", "node-a", "", "", ""), 700.0, 12.5,
        1.98e9)]
    m.target_clock.labels(*labels).set(1.5e9)
    text = m.render().decode()
    assert metric_sum(text, "joulepool_miad_decisions_total") == 3
    assert metric_sum(text, "joulepool_gpu_energy_joules_total") == 12.5
    assert metric_sum(text, "joulepool_gpu_target_clock_hertz") == 1.5e9
    assert metric_sum(text, "joulepool_gpu_sm_clock_hertz") == 1.98e9
    assert metric_sum(text, "joulepool_sidecar_monitor_only") == 0


def test_metric_sum_matches_whole_names() -> None:
    text = "a_total 1\na_total{x=\"1\"} 2\na_total_created 99\nb 5\n"
    assert metric_sum(text, "a_total") == 3
