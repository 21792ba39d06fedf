"""The one engine-metrics parser: queue depth (router) and the full sample (node agent)."""

from __future__ import annotations

import pytest

from joulepool.api.enginemetrics import (
    engine_spec,
    parse_engine_metrics,
    parse_queue,
    parse_queue_sample,
)
from joulepool.nodeagent import signals

VLLM_PAGE = """\
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",cache_dtype="auto"} 1.0
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="meta-llama/Llama-3.1-8B-Instruct"} 12.0
# HELP vllm:num_requests_swapped Number of requests swapped to CPU.
# TYPE vllm:num_requests_swapped gauge
vllm:num_requests_swapped{model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
vllm:num_requests_waiting{model_name="lora-adapter"} 2.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{le="0.001",model_name="m"} 0.0
vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="m"} 17.0
vllm:time_to_first_token_seconds_count{model_name="m"} 17.0
vllm:time_to_first_token_seconds_sum{model_name="m"} 2.5
"""


def test_parse_vllm_page_sums_label_sets() -> None:
    assert parse_queue(VLLM_PAGE) == (5.0, 12.0)


def test_parse_missing_or_broken() -> None:
    assert parse_queue("") is None
    assert parse_queue("# HELP other\nother_metric 1\n") is None
    assert parse_queue("vllm:num_requests_waiting{oops 3\n") is None
    # one gauge is enough; negative and NaN samples are not counted
    assert parse_queue("vllm:num_requests_running 4\n") == (0.0, 4.0)
    assert parse_queue("vllm:num_requests_running -4\nvllm:num_requests_waiting NaN\n") == (
        0.0, 0.0)


def test_router_and_node_agent_read_a_page_by_the_same_rules() -> None:
    assert signals.parse_engine_metrics is parse_engine_metrics
    full = parse_engine_metrics(VLLM_PAGE)
    assert (full.waiting, full.running) == parse_queue(VLLM_PAGE) == (5.0, 12.0)
    assert full.ttft.counts == (0.0, 17.0) and full.queue_seen
    page = "vllm:num_requests_running -4\nvllm:num_requests_waiting NaN\n"
    assert (parse_engine_metrics(page).waiting, parse_engine_metrics(page).running) == (
        0.0, 0.0) == parse_queue(page)
    with pytest.raises(ValueError):
        parse_engine_metrics("vllm:num_requests_waiting{oops 3\n")


V1_AND_LEGACY = """\
vllm:num_requests_running{model_name="m"} 3.0
vllm:num_requests_waiting{model_name="m"} 1.0
vllm:kv_cache_usage_perc{model_name="m"} 0.42
vllm:gpu_cache_usage_perc{model_name="m"} 0.99
vllm:inter_token_latency_seconds_bucket{le="0.01",model_name="m"} 4.0
vllm:inter_token_latency_seconds_bucket{le="+Inf",model_name="m"} 5.0
vllm:time_per_output_token_seconds_bucket{le="0.01",model_name="m"} 0.0
vllm:time_per_output_token_seconds_bucket{le="+Inf",model_name="m"} 9.0
"""
LEGACY_ONLY = """\
vllm:num_requests_running{model_name="m"} 3.0
vllm:gpu_cache_usage_perc{model_name="m"} 0.7
vllm:time_per_output_token_seconds_bucket{le="0.01",model_name="m"} 2.0
vllm:time_per_output_token_seconds_bucket{le="+Inf",model_name="m"} 9.0
"""
SGLANG_PAGE = """\
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="m"} 7.0
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="m"} 2.0
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="m"} 0.81
# TYPE sglang:inter_token_latency_seconds histogram
sglang:inter_token_latency_seconds_bucket{le="0.02",model_name="m"} 6.0
sglang:inter_token_latency_seconds_bucket{le="+Inf",model_name="m"} 8.0
sglang:inter_token_latency_seconds_count{model_name="m"} 8.0
sglang:inter_token_latency_seconds_sum{model_name="m"} 0.1
# TYPE sglang:generation_tokens_total counter
sglang:generation_tokens_total{model_name="m"} 120.0
"""


def test_vllm_v1_names_win_over_the_removed_ones() -> None:
    s = parse_engine_metrics(V1_AND_LEGACY)
    assert s.engine == "vllm" and s.kv_cache_usage == pytest.approx(0.42)
    assert s.tpot.counts == (4.0, 5.0)  # the ITL histogram, not the legacy TPOT one
    legacy = parse_engine_metrics(LEGACY_ONLY)  # an engine before the rename
    assert legacy.kv_cache_usage == pytest.approx(0.7) and legacy.tpot.counts == (2.0, 9.0)
    q = parse_queue_sample(V1_AND_LEGACY)
    assert q is not None and (q.waiting, q.running, q.kv_cache_usage) == (1.0, 3.0, 0.42)


def test_sglang_page_detected_or_named() -> None:
    s = parse_engine_metrics(SGLANG_PAGE)
    assert s.engine == "sglang"
    assert (s.waiting, s.running, s.generation_tokens) == (2.0, 7.0, 120.0)
    assert s.kv_cache_usage == pytest.approx(0.81) and s.tpot.counts == (6.0, 8.0)
    assert parse_queue(SGLANG_PAGE, engine_spec("SGLang")) == (2.0, 7.0)
    # read by the wrong spec, the page has no queue gauges
    assert parse_queue(SGLANG_PAGE, engine_spec("vllm")) is None
    assert engine_spec("tgi") is None and engine_spec(None) is None


def test_histogram_sum_and_count_are_read_summed_over_label_sets() -> None:
    """MIAD's mean ITL divides the ITL histogram's _sum by its _count (summed over models);
    without a _count sample the +Inf bucket counts."""
    page = "\n".join([
        "# TYPE vllm:inter_token_latency_seconds histogram",
        'vllm:inter_token_latency_seconds_bucket{le="0.01",model_name="a"} 3.0',
        'vllm:inter_token_latency_seconds_bucket{le="+Inf",model_name="a"} 4.0',
        'vllm:inter_token_latency_seconds_count{model_name="a"} 4.0',
        'vllm:inter_token_latency_seconds_sum{model_name="a"} 0.05',
        'vllm:inter_token_latency_seconds_bucket{le="0.01",model_name="b"} 1.0',
        'vllm:inter_token_latency_seconds_bucket{le="+Inf",model_name="b"} 1.0',
        'vllm:inter_token_latency_seconds_count{model_name="b"} 1.0',
        'vllm:inter_token_latency_seconds_sum{model_name="b"} 0.004',
        "# TYPE vllm:time_to_first_token_seconds histogram",
        'vllm:time_to_first_token_seconds_bucket{le="0.5"} 1.0',
        'vllm:time_to_first_token_seconds_bucket{le="+Inf"} 2.0',
        "",
    ])
    s = parse_engine_metrics(page)
    assert s.tpot.count == 5.0 and s.tpot.sum == pytest.approx(0.054)
    assert s.ttft.count == 2.0 and s.ttft.sum == 0.0  # no _sum, no _count samples
    assert parse_engine_metrics("").tpot.count == 0.0
