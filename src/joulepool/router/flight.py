"""One OpenAI-style request through the core router: read its shape, pick, measure, learn.

Shared by every front end that sees the request and its response itself (the GIE
endpoint picker :mod:`joulepool.router.epp`; an OpenAI proxy can use the same
objects), so the outcome that moves the PI lambda and the online eps needs no
``/v1/complete`` callback:

* :func:`parse_request` reads ``model``, the prompt and ``max_tokens`` from a
  ``/v1/completions`` or ``/v1/chat/completions`` body. Without a tokenizer the
  prompt's token count is estimated as characters / :data:`CHARS_PER_TOKEN`
  (about 4 for English text with BPE vocabularies); ``usage`` in the response
  gives the real counts later.
* :class:`ResponseMeter` reads the response as it streams (SSE ``data:`` events
  or one JSON body): time of the first token, tokens seen, ``usage``.
* :class:`Flight` holds the decision and reports the outcome exactly once
  (deadline met when the end-to-end time is within the decision's deadline).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from joulepool.core.classes import Tier
from joulepool.core.router import CompletionOutcome, PoolRouter, RouteDecision

#: prompt characters per token when no tokenizer is at hand (an estimate, stated)
CHARS_PER_TOKEN = 4.0


@dataclass(frozen=True)
class RequestShape:
    """What the router needs from a request body: the model name (None if absent), the
    prompt tokens (estimated), the output-token budget (None if the body sets none),
    whether the answer streams, and whether the body was readable JSON at all."""

    model: str | None = None
    input_tokens: float = 0.0
    max_tokens: float | None = None
    stream: bool = False
    parsed: bool = False


def _text_chars(value: Any) -> int:
    """Characters of prompt text in a prompt/messages value (strings, lists, parts)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_text_chars(v) for v in value)
    if isinstance(value, dict):
        return _text_chars(value.get("content")) + _text_chars(value.get("text"))
    return 0


def parse_request(body: bytes) -> RequestShape:
    """The request's shape; a body that is not a JSON object gives ``parsed=False`` and
    defaults (the caller still routes it: the picker fails open on unreadable bodies)."""
    try:
        doc = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        return RequestShape()
    if not isinstance(doc, dict):
        return RequestShape()
    model = doc.get("model")
    chars = _text_chars(doc.get("prompt")) + _text_chars(doc.get("messages"))
    budget = doc.get("max_completion_tokens", doc.get("max_tokens"))
    max_tokens = float(budget) if isinstance(budget, int | float) and budget > 0 else None
    return RequestShape(
        model=model if isinstance(model, str) else None,
        input_tokens=chars / CHARS_PER_TOKEN,
        max_tokens=max_tokens,
        stream=doc.get("stream") is True,
        parsed=True,
    )


@dataclass
class ResponseMeter:
    """Reads a completion response chunk by chunk (seconds, tokens).

    Streaming (``text/event-stream``): each ``data:`` event whose choices carry text is
    one token (engines send one token per event; ``usage`` corrects the count when the
    last event has it). Otherwise the JSON body's ``usage.completion_tokens``.
    """

    streaming: bool = False
    first_token_at: float | None = None
    tokens: float = 0.0
    usage_tokens: float | None = None
    _pending: bytes = b""
    _body: list[bytes] = field(default_factory=list)

    def feed(self, chunk: bytes, now: float) -> None:
        if not self.streaming:
            self._body.append(chunk)
            return
        data = self._pending + chunk
        lines = data.split(b"\n")
        self._pending = lines.pop()
        for line in lines:
            self._event(line.strip(), now)

    def close(self, now: float) -> None:
        """End of the response: the last partial line, or the whole JSON body."""
        if self.streaming:
            if self._pending:
                self._event(self._pending.strip(), now)
                self._pending = b""
            return
        try:
            doc = json.loads(b"".join(self._body))
        except (ValueError, UnicodeDecodeError):
            return
        if isinstance(doc, dict):
            self._usage(doc)
            if self.usage_tokens is not None and self.usage_tokens > 0:
                self.first_token_at = self.first_token_at or now

    def _event(self, line: bytes, now: float) -> None:
        if not line.startswith(b"data:"):
            return
        payload = line[5:].strip()
        if not payload or payload == b"[DONE]":
            return
        try:
            doc = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            return
        if not isinstance(doc, dict):
            return
        if any(_text_chars(c.get("text")) or _text_chars(c.get("delta"))
               for c in doc.get("choices") or () if isinstance(c, dict)):
            self.tokens += 1
            if self.first_token_at is None:
                self.first_token_at = now
        self._usage(doc)

    def _usage(self, doc: dict[str, Any]) -> None:
        usage = doc.get("usage")
        if isinstance(usage, dict):
            n = usage.get("completion_tokens")
            if isinstance(n, int | float) and n >= 0:
                self.usage_tokens = float(n)

    @property
    def output_tokens(self) -> float:
        """``usage``'s count when the engine gave one, else the tokens seen."""
        return self.usage_tokens if self.usage_tokens is not None else self.tokens


def output_estimate(pool: PoolRouter, shape: RequestShape) -> float:
    """Output tokens to route by: the body's budget, else the pool's mean response."""
    if shape.max_tokens is not None:
        return shape.max_tokens
    return pool.mean_out.get(pool.s.mean_output_tokens)


@dataclass
class Flight:
    """One routed request until its outcome is reported (times from one monotonic clock).

    ``served_by`` moves the ledger entry when the gateway served it elsewhere (a
    fallback); ``finish`` reports once; ``abandon`` forgets a request that got no
    answer, without counting it as met or missed.
    """

    pool: PoolRouter
    decision: RouteDecision
    started: float
    served: str = ""
    meter: ResponseMeter = field(default_factory=ResponseMeter)
    done: bool = False

    def __post_init__(self) -> None:
        self.served = self.served or self.decision.endpoint

    def served_by(self, address: str) -> None:
        if (address and address != self.served
                and self.pool.move_routed(self.decision.request_id, self.served, address)):
            self.served = address

    @property
    def ttft_s(self) -> float | None:
        t = self.meter.first_token_at
        return None if t is None else t - self.started

    def finish(self, now: float) -> CompletionOutcome | None:
        """Report the completed request to the pool (None if already reported)."""
        if self.done:
            return None
        self.done = True
        self.meter.close(now)
        met = now - self.started <= self.decision.deadline_s
        return self.pool.report(self.served, self.decision.request_id,
                                self.meter.output_tokens, met, None, now)

    def abandon(self) -> None:
        if not self.done:
            self.done = True
            self.pool.cancel(self.served, self.decision.request_id)


def route_request(pool: PoolRouter, shape: RequestShape, tier: Tier | None,
                  deadline_s: float | None, now: float,
                  subset: frozenset[str] | None = None) -> Flight:
    """Pick an endpoint for the request (NoEndpoints if none may serve it)."""
    decision = pool.decide(output_estimate(pool, shape), shape.input_tokens, tier,
                           deadline_s, now, subset)
    return Flight(pool, decision, now)
