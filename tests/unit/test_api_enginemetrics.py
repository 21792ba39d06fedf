"""The one engine-metrics parser: queue depth (router) and the full sample (node agent)."""

from __future__ import annotations

import pytest

from joulepool.api.enginemetrics import parse_engine_metrics, parse_queue
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
