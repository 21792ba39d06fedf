"""One inference request through the core router: what it asks, the pick, what it measured.

The per-request logic every front end of the router shares: the OpenAI-compatible
proxy (:mod:`joulepool.router.proxy`) calls it, and so can an Envoy ``ext_proc``
endpoint picker. No HTTP here beyond header names and JSON bodies:

* :func:`read_request` turns an OpenAI ``/v1/completions`` or
  ``/v1/chat/completions`` body plus headers into a :class:`RequestSpec`
  (``HTTPProblem`` 400 with the reason on a bad field);
* :func:`choose_pool` finds the pool (header, else the body's ``model``);
* :func:`pick` asks the pool's :class:`~joulepool.core.router.PoolRouter`;
* :class:`ResponseMeter` watches the response bytes as they pass (TTFT, output
  tokens from the stream's chunks or ``usage``, time per output token);
* :func:`learn` reports the measured outcome to the pool (ledger, miss ratio,
  PI lambda), so no client has to call ``/v1/complete``.

Prompt size: no tokenizer is loaded (no model download); prompts are counted at
:data:`CHARS_PER_TOKEN` characters per token, token-id prompts exactly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from joulepool.api import contract
from joulepool.core.classes import Tier
from joulepool.core.router import PoolRouter, RouteDecision, UnknownPool
from joulepool.httpserve import HTTPProblem
from joulepool.kube.pools import Router

#: characters per token of the prompt estimate (English BPE tokenizers average ~4)
CHARS_PER_TOKEN = 4.0
#: upper bounds of the header values (ms) and of max_tokens
MAX_HEADER_MS = 7 * 86400 * 1000.0
MAX_OUTPUT_TOKENS = 10_000_000


@dataclass(frozen=True)
class RequestSpec:
    """What one request asks for: model, prompt and output tokens, tier, SLOs (s)."""

    model: str | None
    pool_header: str | None
    input_tokens: float
    output_tokens: float | None  # max_tokens when given
    stream: bool
    tier: Tier | None = None
    deadline_s: float | None = None
    ttft_slo_s: float | None = None
    tpot_slo_s: float | None = None


def estimate_text_tokens(text: str) -> float:
    """Tokens of ``text`` without a tokenizer: ceil(characters / CHARS_PER_TOKEN)."""
    return float(math.ceil(len(text) / CHARS_PER_TOKEN))


def _prompt_tokens(prompt: Any) -> float:
    if isinstance(prompt, str):
        return estimate_text_tokens(prompt)
    if isinstance(prompt, list):
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return float(len(prompt))  # token ids
        return sum(_prompt_tokens(p) for p in prompt)  # a batch of prompts
    raise HTTPProblem(400, "prompt must be a string, a list of strings or of token ids")


def _message_tokens(messages: Any) -> float:
    if not isinstance(messages, list) or not messages:
        raise HTTPProblem(400, "messages must be a non-empty array of message objects")
    total = 0.0
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise HTTPProblem(400, f"messages[{i}] must be an object")
        content = m.get("content")
        if isinstance(content, list):  # content parts: count their text
            content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        if content is not None and not isinstance(content, str):
            raise HTTPProblem(400, f"messages[{i}].content must be a string or an array")
        total += estimate_text_tokens(content or "")
    return total


def _max_tokens(body: Mapping[str, Any], chat: bool) -> float | None:
    keys = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    for key in keys:
        v = body.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_OUTPUT_TOKENS:
            raise HTTPProblem(400, f"{key} must be an integer in [1, {MAX_OUTPUT_TOKENS}]")
        return float(v)
    return None


def _header_ms(headers: Mapping[str, str], name: str) -> float | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        ms = float(raw)
    except ValueError:
        raise HTTPProblem(400, f"header {name} must be a number of milliseconds") from None
    if not (math.isfinite(ms) and 0 < ms <= MAX_HEADER_MS):
        raise HTTPProblem(400, f"header {name} must be in (0, {MAX_HEADER_MS:.0f}] ms")
    return ms / 1000.0


def _tier(headers: Mapping[str, str]) -> Tier | None:
    raw = headers.get(contract.TIER_HEADER)
    if raw is None:
        return None
    try:
        return Tier(raw.strip().lower())
    except ValueError:
        choices = ", ".join(t.value for t in Tier)
        raise HTTPProblem(400, f"header {contract.TIER_HEADER} must be one of {choices}"
                          ) from None


def headers_only_request(headers: Mapping[str, str]) -> RequestSpec:
    """What the headers alone ask for (pool, tier, SLOs; HTTPProblem 400 on a bad one):
    the endpoint picker's request when the body cannot be read (it fails open)."""
    return RequestSpec(
        model=None, pool_header=headers.get(contract.POOL_HEADER), input_tokens=0.0,
        output_tokens=None, stream=False, tier=_tier(headers),
        deadline_s=_header_ms(headers, contract.DEADLINE_HEADER),
        ttft_slo_s=_header_ms(headers, contract.LLMD_TTFT_HEADER),
        tpot_slo_s=_header_ms(headers, contract.LLMD_TPOT_HEADER),
    )


def read_request(body: Any, headers: Mapping[str, str], chat: bool) -> RequestSpec:
    """The request an OpenAI completions (``chat`` False) or chat completions body asks
    for; header names are :mod:`api.contract`'s. HTTPProblem 400 naming the bad field."""
    if not isinstance(body, dict):
        raise HTTPProblem(400, "request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise HTTPProblem(400, "model must be a string")
    if chat:
        input_tokens = _message_tokens(body.get("messages"))
    else:
        if "prompt" not in body:
            raise HTTPProblem(400, "prompt is required")
        input_tokens = _prompt_tokens(body["prompt"])
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise HTTPProblem(400, "stream must be a boolean")
    pool_header = headers.get(contract.POOL_HEADER)
    if model is None and pool_header is None:
        raise HTTPProblem(400, f"model is required (or the {contract.POOL_HEADER} header)")
    return RequestSpec(
        model=model, pool_header=pool_header, input_tokens=input_tokens,
        output_tokens=_max_tokens(body, chat), stream=stream, tier=_tier(headers),
        deadline_s=_header_ms(headers, contract.DEADLINE_HEADER),
        ttft_slo_s=_header_ms(headers, contract.LLMD_TTFT_HEADER),
        tpot_slo_s=_header_ms(headers, contract.LLMD_TPOT_HEADER),
    )


def pools_serving(router: Router, model: str) -> list[PoolRouter]:
    """The pools that serve ``model`` (one of their served model names, else their
    model, or their name), by name."""
    router.sync()
    return [p for k, p in sorted(router.pools.items()) if model == k or model in p.model_names()]


def choose_pool(router: Router, spec: RequestSpec) -> PoolRouter:
    """The header's pool, else a pool serving the body's model (of the request's tier
    when several do). UnknownPool when there is none."""
    if spec.pool_header is not None:
        return router.pool(spec.pool_header)
    assert spec.model is not None  # read_request requires one of the two
    found = pools_serving(router, spec.model)
    if not found:
        raise UnknownPool(f"The model `{spec.model}` does not exist.")
    if spec.tier is not None:
        for p in found:
            if p.tier is spec.tier:
                return p
    return found[0]


def output_tokens_estimate(pool: PoolRouter, spec: RequestSpec) -> float:
    """Output tokens the request is routed as: its max_tokens, else the pool's mean."""
    if spec.output_tokens is not None:
        return spec.output_tokens
    return max(pool.mean_out.get(pool.s.mean_output_tokens), 1.0)


def deadline_of(spec: RequestSpec, output_tokens: float) -> float | None:
    """The request's end-to-end deadline (s): explicit, or from llm-d's TTFT and TPOT
    headers (both needed), else None (the pool's)."""
    if spec.deadline_s is not None:
        return spec.deadline_s
    if spec.ttft_slo_s is not None and spec.tpot_slo_s is not None:
        return spec.ttft_slo_s + spec.tpot_slo_s * output_tokens
    return None


def pick(pool: PoolRouter, spec: RequestSpec, now: float,
         subset: frozenset[str] | None = None) -> RouteDecision:
    """Route ``spec`` through ``pool``, among ``subset`` (``ip:port``s; None: every
    endpoint) when a gateway restricts it (NoEndpoints when none can serve)."""
    out = output_tokens_estimate(pool, spec)
    return pool.decide(out, spec.input_tokens, spec.tier, deadline_of(spec, out), now,
                       subset)


# --------------------------------------------------------------------------
# Measuring the response as it passes
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class Measured:
    """What the proxy saw of one response (seconds from the request's arrival)."""

    ttft_s: float | None
    e2e_s: float
    output_tokens: float
    tpot_s: float | None
    complete: bool


class ResponseMeter:
    """Reads the response's bytes without changing them: SSE events (each chunk with
    text counts one token until ``usage`` says otherwise) or a JSON body's ``usage``.

    Memory is bounded: only the current incomplete SSE event (and, for a non-streamed
    body, up to ``max_body`` bytes) is kept."""

    def __init__(self, start: float, stream: bool, max_body: int = 8 << 20) -> None:
        self.start = start
        self.stream = stream
        self.max_body = max_body
        self._buf = bytearray()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.chunk_tokens = 0
        self.usage_tokens: float | None = None
        self.done = False

    def feed(self, data: bytes, now: float) -> None:
        if not self.stream:
            if len(self._buf) + len(data) <= self.max_body:
                self._buf += data
            return
        self._buf += data
        while True:
            end = self._buf.find(b"\n\n")
            if end < 0:
                break
            event = bytes(self._buf[:end])
            del self._buf[:end + 2]
            self._event(event, now)

    def _event(self, event: bytes, now: float) -> None:
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.done = True
                return
            try:
                obj = json.loads(payload)
            except ValueError:
                return
            if not isinstance(obj, dict):
                return
            self._usage(obj)
            if _has_text(obj):
                self.chunk_tokens += 1
                if self.first_token_at is None:
                    self.first_token_at = now
                self.last_token_at = now

    def _usage(self, obj: dict[str, Any]) -> None:
        usage = obj.get("usage")
        if isinstance(usage, dict):
            n = usage.get("completion_tokens")
            if isinstance(n, int | float) and not isinstance(n, bool) and n >= 0:
                self.usage_tokens = float(n)

    def finish(self, now: float) -> Measured:
        """The measurement once the response ended (``complete``: it ended normally)."""
        if not self.stream:
            try:
                obj = json.loads(bytes(self._buf))
            except ValueError:
                obj = None
            if isinstance(obj, dict):
                self._usage(obj)
                self.done = True
            tokens = self.usage_tokens or 0.0
            return Measured(None, now - self.start, tokens, None, self.done)
        tokens = self.usage_tokens if self.usage_tokens is not None else float(self.chunk_tokens)
        ttft = None if self.first_token_at is None else self.first_token_at - self.start
        tpot = None
        if self.first_token_at is not None and self.last_token_at is not None and tokens > 1:
            tpot = (self.last_token_at - self.first_token_at) / (tokens - 1)
        return Measured(ttft, now - self.start, tokens, tpot, self.done)


def _has_text(obj: dict[str, Any]) -> bool:
    choices = obj.get("choices")
    if not isinstance(choices, list):
        return False
    for c in choices:
        if not isinstance(c, dict):
            continue
        if c.get("text"):
            return True
        delta = c.get("delta")
        if isinstance(delta, dict) and (delta.get("content") or delta.get("reasoning_content")
                                        or delta.get("tool_calls")):
            return True
    return False


def deadline_met(decision: RouteDecision, spec: RequestSpec, m: Measured) -> bool:
    """Whether the response met the request's deadline (end to end) and, when the
    llm-d headers gave them, its TTFT and TPOT SLOs. An incomplete response missed."""
    if not m.complete or m.e2e_s > decision.deadline_s:
        return False
    if spec.ttft_slo_s is not None and m.ttft_s is not None and m.ttft_s > spec.ttft_slo_s:
        return False
    return not (spec.tpot_slo_s is not None and m.tpot_s is not None
                and m.tpot_s > spec.tpot_slo_s)


def learn(pool: PoolRouter, endpoint: str, decision: RouteDecision, spec: RequestSpec,
          m: Measured, now: float) -> bool:
    """Report the measured outcome to the pool (ledger, miss ratio, PI lambda, and the
    endpoint's eps estimate from the measured tokens x the endpoint's measured J/token
    once the GPU energy of its pod has been read); returns whether the deadline was
    met."""
    met = deadline_met(decision, spec, m)
    # responses carry no joules: the tokens measured here at the endpoint's measured J/token
    joules = pool.measured_joules(endpoint, m.output_tokens)
    pool.report(endpoint, decision.request_id, m.output_tokens, met, joules, now,
                decision.tier)
    return met
