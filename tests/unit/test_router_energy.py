"""The router's measured J/token per endpoint: the pure counter ratio (core.online), the
energy page parser (node agent's exporter, DCGM's), the node agents found in the cluster
cache, and the pool's measured joules of a completion."""

from __future__ import annotations

import pytest

from joulepool.api.contract import COMPONENT_LABEL, NODE_AGENT_COMPONENT
from joulepool.api.enginemetrics import parse_pod_energy, parse_queue_sample
from joulepool.core.online import IncrementRatio
from joulepool.core.router import Endpoint, PoolRouter
from joulepool.core.routing import EndpointModel
from joulepool.kube import testing as T
from joulepool.kube.pools import Router, RouterSettings
from joulepool.kube.state import ClusterState
from joulepool.nodeagent.metrics import AgentMetrics, GPUSample


def test_increment_ratio_spans_resets_and_bad_numbers() -> None:
    r = IncrementRatio(min_span=100)
    assert r.update(0.0, 0.0) is None  # baseline
    assert r.update(50.0, 60.0) is None  # span too short: the baseline stays
    assert r.update(300.0, 120.0) == pytest.approx(2.5)  # 300 J over 120 tokens
    assert r.update(310.0, 130.0) == pytest.approx(2.5)  # short span: previous value
    assert r.update(5.0, 3.0) == pytest.approx(2.5)  # a counter reset: new baseline
    assert r.update(105.0, 103.0) == pytest.approx(1.0)
    assert r.update(float("nan"), 500.0) == pytest.approx(1.0)


def _sample(index: int, pod: str, ns: str, joules: float) -> GPUSample:
    return GPUSample((str(index), f"GPU-{index}", "NVIDIA H100", "H100", "n1", pod, ns,
                      "engine" if pod else ""), 250.0, joules, 1.9e9)


def test_pod_energy_from_the_node_agents_page_sums_a_pods_gpus() -> None:
    metrics = AgentMetrics("n1")
    metrics.gpu_samples = lambda: [_sample(0, "chat-0", "ns", 100.0),
                                   _sample(1, "chat-0", "ns", 50.0),
                                   _sample(2, "chat-1", "ns", 7.0),
                                   _sample(3, "", "", 999.0)]  # no pod holds it
    assert parse_pod_energy(metrics.render().decode()) == {"ns/chat-0": 150.0,
                                                            "ns/chat-1": 7.0}


def test_pod_energy_from_a_dcgm_exporter_page_in_millijoules() -> None:
    page = (
        "# HELP DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION Total energy consumption since boot (mJ).\n"
        "# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter\n"
        'DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{gpu="0",UUID="GPU-0",modelName="NVIDIA H100",'
        'Hostname="n1",container="vllm",namespace="ns",pod="chat-0"} 2500000\n'
        'DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{gpu="1",UUID="GPU-1",modelName="NVIDIA H100",'
        'Hostname="n1",container="",namespace="",pod=""} 1000\n'
        "# TYPE DCGM_FI_DEV_GPU_UTIL gauge\n"
        'DCGM_FI_DEV_GPU_UTIL{gpu="0"} 80\n'
    )
    assert parse_pod_energy(page) == {"ns/chat-0": pytest.approx(2500.0)}
    assert parse_pod_energy("# nothing here\n") == {}
    with pytest.raises(ValueError):
        parse_pod_energy('joulepool_gpu_energy_joules_total{pod="a" 1\n')


def test_the_routers_engine_scrape_reads_the_generated_token_counter() -> None:
    page = ("# TYPE vllm:num_requests_running gauge\n"
            'vllm:num_requests_running{model_name="m"} 3\n'
            "# TYPE vllm:num_requests_waiting gauge\n"
            'vllm:num_requests_waiting{model_name="m"} 1\n'
            "# TYPE vllm:generation_tokens counter\n"
            'vllm:generation_tokens_total{model_name="m"} 4242\n')
    sample = parse_queue_sample(page)
    assert sample is not None and sample.generation_tokens == 4242.0


def test_node_agents_in_the_cluster_cache_are_energy_pages() -> None:
    state = ClusterState()
    agent = T.pod("agent-a", namespace="joulepool-system", pool=None, gpus=0,
                  node_name="n1", ready=True, ip="10.0.0.9")
    agent["metadata"]["labels"][COMPONENT_LABEL] = NODE_AGENT_COMPONENT
    elsewhere = T.pod("agent-b", namespace="other", pool=None, gpus=0, node_name="n2",
                      ready=True, ip="10.0.0.8")
    elsewhere["metadata"]["labels"][COMPONENT_LABEL] = NODE_AGENT_COMPONENT
    unready = T.pod("agent-c", namespace="joulepool-system", pool=None, gpus=0,
                    node_name="n3", ready=False, ip="10.0.0.7")
    unready["metadata"]["labels"][COMPONENT_LABEL] = NODE_AGENT_COMPONENT
    state.replace_pods([agent, elsewhere, unready, T.pod("chat-0", ready=True, ip="10.0.1.1",
                                                          node_name="n1")])
    assert state.node_agents == {"joulepool-system/agent-a", "other/agent-b",
                                 "joulepool-system/agent-c"}
    router = Router(RouterSettings(energy_port=9400, energy_namespace="joulepool-system",
                                   energy_urls=("http://dcgm:9400/metrics",)), state)
    assert router.energy_urls() == ["http://dcgm:9400/metrics",
                                    "http://10.0.0.9:9400/metrics"]
    state.delete_pod("joulepool-system/agent-a")
    assert router.energy_urls() == ["http://dcgm:9400/metrics"]
    assert Router(RouterSettings(), state).energy_urls() == []  # port 0: not discovered


def test_a_completions_joules_are_its_tokens_at_the_measured_j_per_token() -> None:
    pool = PoolRouter("ns.chat")
    pool.set_endpoints([Endpoint("10.0.0.1:8000", EndpointModel.constant(0.1, 1000.0),
                                 pod="ns/chat-0"),
                        Endpoint("10.0.0.2:8000", EndpointModel.constant(0.1, 1000.0))])
    assert pool.measured_joules("10.0.0.1:8000", 100) is None  # nothing measured yet
    for joules, tokens in ((1000.0, 0.0), (1300.0, 1000.0)):
        pool.apply_scrape("10.0.0.1:8000", 0, 1, 0.0, None, tokens)
        pool.apply_scrape("10.0.0.2:8000", 0, 1, 0.0, None, tokens)
        assert pool.apply_energy({"ns/chat-0": joules, "ns/other": 5.0}) == 1
    assert pool.measured_joules("10.0.0.1:8000", 100) == pytest.approx(30.0)
    assert pool.measured_joules("10.0.0.2:8000", 100) is None  # no pod: no energy
    assert pool.measured_joules("10.9.9.9:8000", 100) is None
    out = pool.report("10.0.0.1:8000", None, 2000, True,
                      pool.measured_joules("10.0.0.1:8000", 2000), 1.0)
    assert out.eps_scale == pytest.approx(3.0)  # 0.3 J/token measured over 0.1 modelled
