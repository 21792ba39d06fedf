"""The vLLM metric names joulepool reads (router, node agent) and the fake engine serves."""

from __future__ import annotations

WAITING = "vllm:num_requests_waiting"
RUNNING = "vllm:num_requests_running"
TTFT = "vllm:time_to_first_token_seconds"
TPOT = "vllm:time_per_output_token_seconds"
GENERATION_TOKENS = "vllm:generation_tokens_total"
