"""A stand-in vLLM server on a simulated GPU (``joulepool fake-engine``).

Continuous batching, simplified: each engine step either prefills the newly
admitted requests (``ServingProfile.prefill_s``) or decodes one token for every
running request (``ServingProfile.itl_s(batch, clock)``), at the clock the
simulated GPU runs at right now, so when the node agent lowers the clock the
engine really slows down. The engine writes its batch into the shared GPU
state, so the simulated power and energy counter follow its load.

HTTP (aiohttp): OpenAI-compatible ``POST /v1/completions`` and
``/v1/chat/completions`` (``stream`` true or false; ``stream_options.include_usage``
adds vLLM's final usage chunk), ``GET /v1/models``, ``GET /health`` and
``GET /metrics`` with vLLM V1's metric names (``vllm:inter_token_latency_seconds``,
``vllm:kv_cache_usage_perc``, ``vllm:request_prompt_tokens`` with vLLM's 1-2-5 buckets)
or, with ``engine="sglang"``, SGLang's (``sglang:prompt_tokens_histogram`` with SGLang's
default buckets).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from joulepool import httpserve
from joulepool.api.enginemetrics import ENGINE_SPECS, VLLM
from joulepool.core.device import GPUError
from joulepool.core.profiles import ServingProfile
from joulepool.fakes.gpus import SimulatedGPUs

log = logging.getLogger("joulepool.fake_engine")

#: vLLM's bucket layout, with finer steps where H100 decode lives (5-15 ms)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.005, 0.0075, 0.01, 0.0125, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
                0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
MAX_TOKENS_LIMIT = 8192
#: the context length the prompt-length buckets reach (Llama 3.1: 131,072 tokens)
MAX_MODEL_LEN = 131_072
#: SGLang's default ``sglang:prompt_tokens_histogram`` buckets (tokens)
SGLANG_PROMPT_BUCKETS = (100, 300, 500, 700, 1000, 1500, 2000, *range(3000, 10001, 1000),
                         *range(12500, 30001, 2500), 35000, 40000, 60000, 80000, 100000,
                         200000)


def one_two_five_buckets(limit: int) -> tuple[int, ...]:
    """vLLM's prompt-length buckets: 1, 2, 5, 10, 20, 50, ... up to ``limit``."""
    out: list[int] = []
    exponent = 0
    while True:
        for m in (1, 2, 5):
            value = m * 10**exponent
            if value > limit:
                return tuple(out)
            out.append(value)
        exponent += 1
#: largest request body (a prompt of ~1 M tokens at 4 characters per token)
MAX_BODY_BYTES = 4 << 20


class EngineMetrics:
    """The engine's Prometheus page under ``engine``'s names (:data:`ENGINE_SPECS`:
    vLLM V1's current names, or SGLang's)."""

    def __init__(self, model: str, gpus: Sequence[int], product: str,
                 registry: CollectorRegistry | None = None, engine: str = VLLM.name) -> None:
        spec = ENGINE_SPECS.get(engine)
        if spec is None:
            raise ValueError(f"unknown engine {engine!r}; choose from {sorted(ENGINE_SPECS)}")
        self.registry = registry or CollectorRegistry()
        r, labels = self.registry, ("model_name",)
        self.model = model
        self.engine = spec.name
        self.waiting = Gauge(spec.waiting[0], "Requests waiting to be processed",
                             labels, registry=r)
        self.running = Gauge(spec.running[0], "Requests in the running batch",
                             labels, registry=r)
        self.kv_cache = Gauge(spec.kv_cache[0], "Fraction of the KV cache in use (0..1)",
                              labels, registry=r)
        self.ttft = Histogram(spec.ttft[0], "Time to first token",
                              labels, buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram(spec.itl[0], "Time between output tokens",
                              labels, buckets=TPOT_BUCKETS, registry=r)
        self.prompt_lengths = Histogram(
            spec.prompt_tokens[0], "Prompt tokens of each finished request", labels,
            buckets=(SGLANG_PROMPT_BUCKETS if spec.name == "sglang"
                     else one_two_five_buckets(MAX_MODEL_LEN)), registry=r)
        self.generation_tokens = Counter(spec.generation_tokens[0].removesuffix("_total"),
                                         "Generated tokens", labels, registry=r)
        self.prompt_tokens = Counter(f"{spec.prefix}prompt_tokens", "Prefilled prompt tokens",
                                     labels, registry=r)
        self.success = Counter(f"{spec.prefix}request_success", "Finished requests",
                               (*labels, "finished_reason"), registry=r)
        self.gpu_info = Gauge("joulepool_engine_gpu_info",
                              "GPUs this engine runs on (from the device plugin)",
                              ("gpu", "product", "model_name"), registry=r)
        self.clock = Gauge("joulepool_engine_gpu_clock_mhz", "SM clock the engine runs at",
                           labels, registry=r)
        for m in (self.waiting, self.running, self.kv_cache):
            m.labels(model).set(0)
        self.ttft.labels(model)
        self.tpot.labels(model)
        self.prompt_lengths.labels(model)
        self.generation_tokens.labels(model)
        if gpus:
            self.gpu_info.labels(",".join(str(g) for g in gpus), product, model).set(1)


@dataclass
class _Request:
    rid: str
    prompt_tokens: int
    max_tokens: int
    arrival: float
    out: asyncio.Queue[int | None] = field(default_factory=asyncio.Queue)
    generated: int = 0
    last_token_at: float | None = None
    cancelled: bool = False


class FakeEngine:
    """The batching loop. ``monotonic`` and ``sleep`` are injectable (tests)."""

    def __init__(
        self,
        profile: ServingProfile,
        gpus: SimulatedGPUs | None = None,
        gpu_indices: Sequence[int] = (),
        max_batch: int | None = None,
        metrics: EngineMetrics | None = None,
        kv_cache_tokens: int | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock_refresh_s: float = 0.05,
    ) -> None:
        self.profile = profile
        self.gpus = gpus
        self.gpu_indices = list(gpu_indices)
        self.max_batch = int(max_batch or profile.max_batch.value)
        if self.max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.metrics = metrics or EngineMetrics(profile.model, self.gpu_indices,
                                                profile.product.name)
        #: KV-cache capacity in tokens (prompt + generated of the running requests);
        #: default 2,048 per batch slot
        self.kv_cache_tokens = int(kv_cache_tokens or self.max_batch * 2048)
        self.monotonic = monotonic
        self.sleep = sleep
        self.clock_refresh_s = clock_refresh_s
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._clock_cache: tuple[float, float] | None = None
        self._written_batch: float | None = None
        self.steps = 0

    # -- the GPU --------------------------------------------------------------
    def clock_mhz(self) -> float:
        """The clock the engine's slowest GPU runs at (f_max without shared state)."""
        if self.gpus is None or not self.gpu_indices:
            return self.profile.f_max
        now = self.monotonic()
        if self._clock_cache is not None and now - self._clock_cache[0] < self.clock_refresh_s:
            return self._clock_cache[1]
        try:
            clock = min(self.gpus.effective_clock(self.gpus.gpu(i)) for i in self.gpu_indices)
        except (GPUError, OSError) as exc:
            log.warning("cannot read simulated GPU state: %s", exc)
            clock = self._clock_cache[1] if self._clock_cache else self.profile.f_max
        self._clock_cache = (now, clock)
        self.metrics.clock.labels(self.profile.model).set(clock)
        return clock

    def _write_batch(self) -> None:
        batch = float(len(self.running))
        if self.gpus is None or not self.gpu_indices or batch == self._written_batch:
            return
        try:
            self.gpus.set_batch(self.gpu_indices, batch, self.profile.model)
            self._written_batch = batch
        except (GPUError, OSError) as exc:
            log.warning("cannot write simulated GPU state: %s", exc)

    def _gauges(self) -> None:
        m = self.profile.model
        self.metrics.waiting.labels(m).set(len(self.waiting))
        self.metrics.running.labels(m).set(len(self.running))
        used = sum(r.prompt_tokens + r.generated for r in self.running)
        self.metrics.kv_cache.labels(m).set(min(used / self.kv_cache_tokens, 1.0))

    # -- requests ---------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for r in [*self.waiting, *self.running]:
            r.out.put_nowait(None)
        self.waiting.clear()
        self.running.clear()
        self._write_batch()

    async def generate(self, prompt_tokens: int, max_tokens: int) -> AsyncIterator[int]:
        """Yield token numbers 0..max_tokens-1 as the simulated GPU produces them."""
        self.start()
        req = _Request(uuid.uuid4().hex[:16], max(prompt_tokens, 1), max_tokens, self.monotonic())
        self.waiting.append(req)
        self._gauges()
        self._wake.set()
        try:
            while True:
                tok = await req.out.get()
                if tok is None:
                    return
                yield tok
        finally:
            req.cancelled = True  # client went away: free its batch slot

    # -- the loop -----------------------------------------------------------------
    async def _loop(self) -> None:
        next_t = self.monotonic()
        while True:
            self.running = [r for r in self.running if not r.cancelled]
            while self.waiting and self.waiting[0].cancelled:
                self.waiting.popleft()
            if not self.running and not self.waiting:
                self._gauges()
                self._write_batch()
                self._wake.clear()
                await self._wake.wait()
                next_t = self.monotonic()
                continue
            admitted: list[_Request] = []
            while self.waiting and len(self.running) + len(admitted) < self.max_batch:
                r = self.waiting.popleft()
                if not r.cancelled:
                    admitted.append(r)
            self.running.extend(admitted)
            self._gauges()
            self._write_batch()
            clock = self.clock_mhz()
            if admitted:  # a prefill step: the new requests' prompts, their first token
                dt = float(self.profile.prefill_s(sum(r.prompt_tokens for r in admitted), clock))
                emit = admitted
                self.metrics.prompt_tokens.labels(self.profile.model).inc(
                    sum(r.prompt_tokens for r in admitted))
            else:  # a decode step: one token for everyone running
                dt = float(self.profile.itl_s(len(self.running), clock))
                emit = list(self.running)
            # sleep to a schedule, so Python's own overhead does not slow the token rate
            next_t = max(next_t + dt, self.monotonic() - 0.05)
            await self.sleep(max(next_t - self.monotonic(), 0.0))
            self.steps += 1
            now = self.monotonic()
            model = self.profile.model
            for r in emit:
                if r.cancelled:
                    continue
                if r.generated == 0:
                    self.metrics.ttft.labels(model).observe(now - r.arrival)
                elif r.last_token_at is not None:
                    self.metrics.tpot.labels(model).observe(now - r.last_token_at)
                r.last_token_at = now
                r.out.put_nowait(r.generated)
                r.generated += 1
                self.metrics.generation_tokens.labels(model).inc()
                if r.generated >= r.max_tokens:
                    r.out.put_nowait(None)
                    r.cancelled = True
                    self.metrics.success.labels(model, "length").inc()
                    # as vLLM and SGLang: a request's prompt is counted when it finishes
                    self.metrics.prompt_lengths.labels(model).observe(r.prompt_tokens)


# ---------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------
def count_prompt_tokens(prompt: Any) -> int:
    """A rough tokenizer: ~4 characters per token; a list of ints is token ids."""
    if isinstance(prompt, list):
        if prompt and all(isinstance(t, int) for t in prompt):
            return len(prompt)
        prompt = prompt[0] if prompt else ""
    if not isinstance(prompt, str):
        raise ValueError("prompt must be a string, a list of strings or a list of token ids")
    return max(1, len(prompt) // 4)


def _error(status: int, message: str, etype: str = "invalid_request_error") -> web.Response:
    return httpserve.json_response(
        {"error": {"message": message, "type": etype, "code": status}}, status=status)


def token_text(i: int) -> str:
    return f" tok{i}"


def count_message_tokens(messages: Any) -> int:
    """Prompt tokens of chat ``messages`` (the contents' text by :func:`count_prompt_tokens`)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    text = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # content parts: their text
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise ValueError("each message needs a string content")
        text.append(content)
    return count_prompt_tokens("\n".join(text))


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _sse(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


@dataclass(frozen=True)
class _Shape:
    """The OpenAI object shapes of one response (text completion or chat completion)."""

    chat: bool
    rid: str
    created: int
    model: str

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, text: str | None, finish: str | None, role: bool = False
              ) -> dict[str, Any]:
        if not self.chat:
            out = self._head("text_completion")
            out["choices"] = [{"index": 0, "text": text or "", "logprobs": None,
                               "finish_reason": finish}]
            return out
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text is not None:
            delta["content"] = text
        out = self._head("chat.completion.chunk")
        out["choices"] = [{"index": 0, "delta": delta, "logprobs": None,
                           "finish_reason": finish}]
        return out

    def whole(self, text: str) -> dict[str, Any]:
        if not self.chat:
            return self.chunk(text, "length")
        out = self._head("chat.completion")
        out["choices"] = [{"index": 0, "message": {"role": "assistant", "content": text},
                           "logprobs": None, "finish_reason": "length"}]
        return out


def _max_tokens(body: dict[str, Any], chat: bool) -> int | None:
    """The request's output-token limit (OpenAI's default 16), or None when it is invalid."""
    value = body.get("max_completion_tokens", body.get("max_tokens", 16)) if chat \
        else body.get("max_tokens", 16)
    if isinstance(value, bool) or not isinstance(value, int) or \
            not 1 <= value <= MAX_TOKENS_LIMIT:
        return None
    return value


async def _stream(request: web.Request, engine: FakeEngine, shape: _Shape, prompt_tokens: int,
                  max_tokens: int, include_usage: bool) -> web.StreamResponse:
    """Server-sent events as vLLM sends them: role chunk (chat), one chunk per token,
    an optional usage chunk, then ``[DONE]``."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache"})
    await resp.prepare(request)
    n = 0
    if shape.chat:  # vLLM's first chat chunk carries the role
        await resp.write(_sse(shape.chunk(None, None, role=True)))
    async for tok in engine.generate(prompt_tokens, max_tokens):
        n += 1
        finish = "length" if n >= max_tokens else None
        await resp.write(_sse(shape.chunk(token_text(tok), finish)))
    if include_usage:
        last = shape.chunk(None, None)
        last["choices"] = []
        last["usage"] = _usage(prompt_tokens, n)
        await resp.write(_sse(last))
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


def build_app(engine: FakeEngine, served_model: str | Sequence[str] | None = None
              ) -> web.Application:
    """The engine's HTTP API; it answers to ``served_model`` (a name or several, as vLLM's
    ``--served-model-name``; responses name the first), default the profile's model."""
    names = [served_model] if isinstance(served_model, str) else list(served_model or ())
    names = names or [engine.profile.model]
    model_name = names[0]
    app = web.Application(client_max_size=MAX_BODY_BYTES)

    async def serve(request: web.Request, chat: bool) -> web.StreamResponse:
        try:  # application/json only, bounded, RFC 8259 (no NaN/Infinity)
            body = await httpserve.read_json(request, MAX_BODY_BYTES)
        except httpserve.HTTPProblem as exc:
            return _error(exc.status, exc.message)
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object")
        model = body.get("model", model_name)
        if model not in names:
            return _error(404, f"The model `{model}` does not exist.", "NotFoundError")
        try:
            prompt_tokens = (count_message_tokens(body.get("messages")) if chat
                             else count_prompt_tokens(body.get("prompt", "")))
        except ValueError as exc:
            return _error(400, str(exc))
        max_tokens = _max_tokens(body, chat)
        if max_tokens is None:
            return _error(400, f"max_tokens must be an integer in [1, {MAX_TOKENS_LIMIT}]")
        shape = _Shape(chat, f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                       int(time.time()), model_name)
        if not body.get("stream", False):
            parts = [token_text(tok) async for tok in engine.generate(prompt_tokens, max_tokens)]
            out = shape.whole("".join(parts))
            out["usage"] = _usage(prompt_tokens, len(parts))
            return web.json_response(out)
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        return await _stream(request, engine, shape, prompt_tokens, max_tokens, include_usage)

    async def completions(request: web.Request) -> web.StreamResponse:
        return await serve(request, chat=False)

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        return await serve(request, chat=True)

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": n, "object": "model", "owned_by": "joulepool-fake-engine"} for n in names]})

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def metrics(_: web.Request) -> web.Response:
        engine.clock_mhz()
        return web.Response(body=generate_latest(engine.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def on_startup(_: web.Application) -> None:
        engine.start()

    async def on_cleanup(_: web.Application) -> None:
        await engine.close()

    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app
