"""A seeded, bounded HTTP fuzzer for joulepool's services (tests and ``joulepool bench fuzz``).

For each endpoint it generates requests from a valid example by structural mutation:
leaves replaced with hostile values (huge and non-finite numbers written as raw JSON
tokens, resource quantities such as ``1e999999``, wrong types, long and odd strings),
keys dropped or added, containers nested thousands deep, the text truncated or salted
with invalid UTF-8, and the method, path, query and ``Content-Type`` varied. The same
seed gives the same requests.

:func:`run` sends them over HTTP with bounded concurrency and checks the service's
contract: no 5xx, no answer slower than ``max_latency_s``, every request answered, and
the service still healthy at the end (its health endpoint answers within the latency
bound: no worker is stuck).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

#: JSON text for a value that json.dumps cannot write (NaN, 1e999999, a 5000-digit integer)
RAW_TOKENS = ["NaN", "Infinity", "-Infinity", "1e999999", "-1e999999", "1e309", "1" * 5000,
              "-0", "1e-400", "18446744073709551616", "0.1e1", "1E+2"]
#: resource quantities, valid and hostile
QUANTITIES = ["1", "0", "-1", "8", "500m", "1Gi", "1e3", "1e999999", "1E999999", "9" * 64,
              "9" * 65, "1e30Ei", "99999999999999999999Ei", "0.0000001", "abc", "", " 1 ",
              "1.5.5", "+", "1e", "NaN", "Infinity", "1Ki", "1k", "1EiB", "0x10"]
STRINGS = ["", " ", "x" * 5000, "\u0000", "\ud7ff\ue000", "../../etc/passwd", "%s%n",
           "<script>", "default.chat", "ns.", ".", "a" * 300 + ".b", "\u202e", "🙂" * 100]
#: header values an HTTP client can send (no control characters)
HEADER_VALUES = ["", "Bearer ", "Bearer " + "x" * 4000, "Basic Zm9vOmJhcg==", "*/*",
                 "text/html;q=0.1", "1.2.3.4, 5.6.7.8", "a=b; c=d", "\u00e9\u00e8"]
CONTENT_TYPES = ["application/json", "application/json; charset=utf-8", "text/plain",
                 "application/x-www-form-urlencoded", "", "application/json; charset=latin-1",
                 "APPLICATION/JSON", "application/merge-patch+json", "multipart/form-data"]


class Raw:
    """A JSON token written verbatim (numbers json.dumps refuses or would normalise)."""

    def __init__(self, text: str) -> None:
        self.text = text


def dumps(value: Any) -> str:
    """JSON text of ``value``; :class:`Raw` leaves are written verbatim."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return json.dumps(value)


@dataclass(frozen=True)
class Endpoint:
    """One endpoint: method, path and (for POST) a valid example body to mutate."""

    name: str
    method: str
    path: str
    example: Any = None


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    body: bytes | None
    headers: dict[str, str]


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a node of a JSON document (containers included)."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out.extend(_paths(v, (*prefix, k)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.extend(_paths(v, (*prefix, i)))
    return out


def _copy(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _set(doc: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    parent = doc
    for part in path[:-1]:
        parent = parent[part]
    parent[path[-1]] = new
    return doc


def _hostile_value(rng: random.Random, key: Any) -> Any:
    roll = rng.random()
    if isinstance(key, str) and (key.startswith("nvidia.com") or key in
                                 ("cpu", "memory", "pods")) and roll < 0.7:
        return rng.choice(QUANTITIES)
    choices: list[Callable[[], Any]] = [
        lambda: Raw(rng.choice(RAW_TOKENS)),
        lambda: rng.choice(STRINGS),
        lambda: rng.choice([None, True, False, 0, -1, 2**63, -(2**63) - 1, 1.5, 1e308]),
        lambda: rng.choice([[], {}, [None], {"": None}]),
        lambda: rng.choice(QUANTITIES),
        lambda: rng.randint(-(10**12), 10**12),
    ]
    return rng.choice(choices)()


def _nest(rng: random.Random) -> Any:
    depth = rng.choice([10, 63, 64, 65, 200, 1000, 5000, 50000])
    return Raw("[" * depth + "]" * depth if rng.random() < 0.5
               else '{"a":' * depth + "1" + "}" * depth)


def mutate(example: Any, rng: random.Random) -> str:
    """The JSON text of one structural mutation (1-3 edits) of ``example``."""
    doc = _copy(example)
    for _ in range(rng.randint(1, 3)):
        paths = _paths(doc)
        path = rng.choice(paths)
        roll = rng.random()
        if roll < 0.5:
            doc = _set(doc, path, _hostile_value(rng, path[-1] if path else None))
        elif roll < 0.65 and path:
            parent = doc
            for part in path[:-1]:
                parent = parent[part]
            if isinstance(parent, dict):
                parent.pop(path[-1], None)
            elif isinstance(parent, list) and parent:
                parent.pop(path[-1])
        elif roll < 0.75:
            doc = _set(doc, path, _nest(rng))
        elif roll < 0.85:
            target = doc
            for part in path:
                target = target[part]
            if isinstance(target, dict):
                target[rng.choice(STRINGS[:9])] = _hostile_value(rng, None)
            elif isinstance(target, list):
                target.extend([_hostile_value(rng, None)] * rng.choice([1, 10, 1000]))
        else:
            doc = _set(doc, path, _copy(example))  # self-similar growth
    return dumps(doc)


def _mangle_text(text: str, rng: random.Random) -> bytes:
    data = text.encode("utf-8", "surrogatepass")
    roll = rng.random()
    if roll < 0.05:
        return data[: rng.randint(0, max(len(data) - 1, 0))]  # truncated
    if roll < 0.08:
        i = rng.randint(0, len(data))
        return data[:i] + rng.choice([b"\xff", b"\xc3\x28", b"\x00", b"\xef\xbb\xbf"]) + data[i:]
    if roll < 0.10:
        return data + rng.choice([b" trailing", b"}", b"\n{}", b"\x00"])
    if roll < 0.11:
        return b"\xef\xbb\xbf" + data  # BOM
    return data


def generate(endpoint: Endpoint, count: int, seed: int) -> list[Request]:
    """``count`` requests for ``endpoint``, reproducible from ``seed``."""
    rng = random.Random(f"{seed}:{endpoint.name}")
    out = []
    for _ in range(count):
        method, path = endpoint.method, endpoint.path
        headers: dict[str, str] = {}
        body: bytes | None = None
        if rng.random() < 0.03:
            method = rng.choice(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
        if rng.random() < 0.05:
            path = path + rng.choice(["/", "/x", "?a=1", "?" + "a=" * 500, "%00", "/../..",
                                      "//" + "x" * 2000, "?pool=%ff"])
        if endpoint.example is not None:
            text = mutate(endpoint.example, rng) if rng.random() < 0.95 else dumps(
                endpoint.example)
            body = _mangle_text(text, rng)
            headers["Content-Type"] = (CONTENT_TYPES[0] if rng.random() < 0.85
                                       else rng.choice(CONTENT_TYPES))
        elif rng.random() < 0.1:
            body = _mangle_text(mutate({"a": [1, "b"]}, rng), rng)
        if rng.random() < 0.05:
            headers[rng.choice(["Authorization", "Accept", "X-Forwarded-For", "Cookie"])] = \
                rng.choice(HEADER_VALUES)
        out.append(Request(method, path, body, headers))
    return out


# -- running -------------------------------------------------------------------------------

@dataclass
class EndpointResult:
    name: str
    sent: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    max_latency_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    #: (reason, request) of the first violations (5xx, too slow, no answer)
    violations: list[tuple[str, Request]] = field(default_factory=list)
    violation_count: int = 0

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_s)
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else 0.0
        return {"endpoint": self.name, "requests": self.sent,
                "statuses": dict(sorted(self.statuses.items())),
                "p99_ms": round(p99 * 1e3, 3), "max_ms": round(self.max_latency_s * 1e3, 3),
                "violations": self.violation_count}


@dataclass
class FuzzReport:
    results: list[EndpointResult]
    healthy_after: bool
    health_latency_s: float

    @property
    def total(self) -> int:
        return sum(r.sent for r in self.results)

    @property
    def ok(self) -> bool:
        return self.healthy_after and all(r.violation_count == 0 for r in self.results)

    def describe_violations(self, limit: int = 5) -> str:
        lines = []
        for r in self.results:
            for reason, req in r.violations[:limit]:
                body = (req.body or b"")[:300]
                lines.append(f"{r.name}: {reason}: {req.method} {req.path[:200]} "
                             f"{req.headers} {body!r}")
        if not self.healthy_after:
            lines.append(f"service not healthy afterwards ({self.health_latency_s:.2f} s)")
        return "\n".join(lines)


async def _send(session: Any, base: str, req: Request, timeout_s: float
                ) -> tuple[int | None, float]:
    import aiohttp

    t0 = time.perf_counter()
    try:
        async with session.request(req.method, base + req.path, data=req.body,
                                   headers=req.headers, skip_auto_headers=["Content-Type"],
                                   timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            await resp.read()
            return resp.status, time.perf_counter() - t0
    except (TimeoutError, aiohttp.ClientError):
        return None, time.perf_counter() - t0


async def _run_endpoint(session: Any, base: str, endpoint: Endpoint, requests: Sequence[Request],
                        concurrency: int, max_latency_s: float) -> EndpointResult:
    result = EndpointResult(endpoint.name)
    queue = list(reversed(requests))

    async def worker() -> None:
        while queue:
            req = queue.pop()
            status, took = await _send(session, base, req, max(10 * max_latency_s, 10.0))
            result.sent += 1
            result.latencies_s.append(took)
            result.max_latency_s = max(result.max_latency_s, took)
            reason = None
            if status is None:
                reason = f"no answer within {took:.1f} s"
            else:
                result.statuses[status] += 1
                if status >= 500:
                    reason = f"HTTP {status}"
                elif took > max_latency_s:
                    reason = f"answered in {took:.2f} s"
            if reason:
                result.violation_count += 1
                if len(result.violations) < 20:
                    result.violations.append((reason, req))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return result


async def run(base: str, endpoints: Sequence[Endpoint], per_endpoint: int, seed: int,
              concurrency: int = 8, max_latency_s: float = 1.0,
              health_path: str = "/healthz") -> FuzzReport:
    """Fuzz every endpoint of the service at ``base`` (``http://host:port``)."""
    import aiohttp

    results = []
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        for ep in endpoints:
            reqs = generate(ep, per_endpoint, seed)
            results.append(await _run_endpoint(session, base, ep, reqs, concurrency,
                                               max_latency_s))
        status, took = await _send(session, base, Request("GET", health_path, None, {}),
                                   max_latency_s)
    return FuzzReport(results, status == 200 and took <= max_latency_s, took)


# -- the services' endpoints ----------------------------------------------------------------

def _operations() -> list[Endpoint]:
    return [Endpoint("metrics", "GET", "/metrics"), Endpoint("healthz", "GET", "/healthz"),
            Endpoint("readyz", "GET", "/readyz")]


def extender_endpoints(pool: str, node_names: Sequence[str],
                       prefix: str = "/scheduler") -> list[Endpoint]:
    """Every endpoint of ``joulepool extender`` with a valid example body each."""
    from joulepool.kube import testing as T

    pod = T.pod("fuzz-0", pool=pool, gpus=1, mode="1xH100")
    names = list(node_names)
    full = T.extender_args(pod, nodes=[T.node(n) for n in names[:3]])
    return [
        Endpoint("filter", "POST", f"{prefix}/filter", T.extender_args(pod, names=names)),
        Endpoint("filter-full-nodes", "POST", f"{prefix}/filter", full),
        Endpoint("prioritize", "POST", f"{prefix}/prioritize",
                 T.extender_args(pod, names=names)),
        *_operations(),
    ]


def router_endpoints(pool: str) -> list[Endpoint]:
    """Every endpoint of ``joulepool router`` with a valid example body each."""
    route = {"pool": pool, "inputTokens": 512, "outputTokens": 128, "tier": "interactive",
             "deadlineSeconds": 2.5}
    complete = {"pool": pool, "endpoint": "10.0.0.1:8000", "requestId": "r-1",
                "ttftSeconds": 0.2, "e2eSeconds": 1.5, "outputTokens": 128,
                "deadlineMet": True, "joules": 12.5}
    return [
        Endpoint("route", "POST", "/v1/route", route),
        Endpoint("complete", "POST", "/v1/complete", complete),
        Endpoint("pools", "GET", "/v1/pools"),
        Endpoint("pool", "GET", f"/v1/pools/{pool}"),
        *_operations(),
    ]


def proxy_endpoints(model: str) -> list[Endpoint]:
    """The OpenAI-compatible proxy of ``joulepool router`` (a pool serving ``model`` must
    have a live engine behind it: the proxy forwards what it accepts)."""
    completion = {"model": model, "prompt": "Say hello", "max_tokens": 8, "stream": False}
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}],
            "max_completion_tokens": 8, "stream": True,
            "stream_options": {"include_usage": True}}
    return [
        Endpoint("completions", "POST", "/v1/completions", completion),
        Endpoint("chat-completions", "POST", "/v1/chat/completions", chat),
        Endpoint("models", "GET", "/v1/models"),
    ]


def write_extender_inputs(workdir: Any, pool: str = "default.chat", n_nodes: int = 30
                          ) -> tuple[list[str], list[str]]:
    """Files for ``joulepool extender --no-cluster`` (and ``joulepool router``, which takes
    the same arguments): GPU nodes (H100/A100/L4), ready serving pods of ``pool`` on them
    (the router's endpoints) and a plan giving the pool the H100 and A100 nodes. Returns
    (service arguments, node names)."""
    from pathlib import Path

    from joulepool.kube import testing as T

    work = Path(workdir)
    products = ("H100", "A100", "L4")
    nodes = [T.node(f"gpu-{products[i % 3].lower()}-{i:03d}", products[i % 3],
                    gpus=4 if i % 3 == 2 else 8) for i in range(n_nodes)]
    names = [n["metadata"]["name"] for n in nodes]
    planned: list[tuple[str, str, int] | tuple[str, str, int, int]] = [
        (str(n), products[i % 3], 2, 1) for i, n in enumerate(names) if i % 3 < 2]
    pods = []
    for k in range(min(20, len(planned))):
        node, product = planned[k][0], planned[k][1]
        pods.append(T.pod(f"chat-{k}", pool=pool, node_name=node, gpus=1, ready=True,
                          ip=f"10.0.{k // 256}.{k % 256}", mode=f"1x{product}"))
    (work / "nodes.json").write_text(json.dumps({"kind": "List", "items": nodes + pods}))
    (work / "plan.json").write_text(T.plan({pool: planned}).to_json())
    args = ["--no-cluster", "--nodes-file", str(work / "nodes.json"),
            "--plan-file", str(work / "plan.json"), "--scrape-interval-seconds", "0",
            "--file-poll-seconds", "0", "--max-body-bytes", str(1 << 20)]
    return args, names
