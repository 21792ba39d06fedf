"""The engine metric names joulepool reads (router, node agent) and the fake engine serves.

vLLM V1 names first; vLLM removed ``vllm:time_per_output_token_seconds`` (now
``vllm:inter_token_latency_seconds``) and ``vllm:gpu_cache_usage_perc`` (now
``vllm:kv_cache_usage_perc``): the pre-rename names are read as fallbacks
(:data:`joulepool.api.enginemetrics.ENGINE_SPECS`). SGLang's names are below.
"""

from __future__ import annotations

WAITING = "vllm:num_requests_waiting"
RUNNING = "vllm:num_requests_running"
TTFT = "vllm:time_to_first_token_seconds"
#: time between two output tokens of a request (vLLM V1)
ITL = "vllm:inter_token_latency_seconds"
#: fraction of the KV cache in use, 0..1 (vLLM V1)
KV_CACHE = "vllm:kv_cache_usage_perc"
GENERATION_TOKENS = "vllm:generation_tokens_total"
#: prompt tokens of each finished request (histogram; vLLM's buckets are 1, 2, 5, 10, 20,
#: 50, ... up to the model's context length); the name is the same in V0 and V1
PROMPT_TOKENS = "vllm:request_prompt_tokens"
#: pre-rename vLLM names (removed upstream), read when the V1 ones are absent
LEGACY_TPOT = "vllm:time_per_output_token_seconds"
LEGACY_KV_CACHE = "vllm:gpu_cache_usage_perc"
#: kept for callers of the old name: the inter-token latency histogram
TPOT = ITL

SGLANG_RUNNING = "sglang:num_running_reqs"
SGLANG_WAITING = "sglang:num_queue_reqs"
#: fraction of SGLang's KV token pool in use, 0..1
SGLANG_KV_CACHE = "sglang:token_usage"
SGLANG_TTFT = "sglang:time_to_first_token_seconds"
SGLANG_ITL = "sglang:inter_token_latency_seconds"
#: older SGLang's name of the ITL histogram; current SGLang observes each finished
#: request's e2e latency over its output tokens under it (read only when the ITL one is
#: absent)
SGLANG_LEGACY_TPOT = "sglang:time_per_output_token_seconds"
SGLANG_GENERATION_TOKENS = "sglang:generation_tokens_total"
#: prompt tokens of each finished request (histogram; SGLang serves it only when started
#: with ``--collect-tokens-histogram``)
SGLANG_PROMPT_TOKENS = "sglang:prompt_tokens_histogram"
