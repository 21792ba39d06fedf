"""The seeded HTTP fuzzer (joulepool.fuzz) against ``joulepool extender`` and
``joulepool router`` as processes: every endpoint, a few hundred generated requests
each (``joulepool bench fuzz`` runs >= 10,000 per endpoint). No 5xx, no answer slower
than 1 s, the service healthy after."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from joulepool import fuzz

PER_ENDPOINT = 150
SEED = 14


def _service(command: str, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[tuple[str, list[str]]]:
    work = tmp_path_factory.mktemp("fuzz")
    args, names = fuzz.write_extender_inputs(work)
    proc = subprocess.Popen([sys.executable, "-m", "joulepool.cli", command, *args,
                             "--host", "127.0.0.1", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "listening on" in line, line + (proc.stderr.read() if proc.stderr else "")
    try:
        yield line.split()[-1], names
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
        # the fuzzer found nothing the service had to log as an internal error
        assert "internal error" not in err and "Traceback" not in err, err[-3000:]


@pytest.fixture(scope="module")
def extender(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list[str]]]:
    yield from _service("extender", tmp_path_factory)


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list[str]]]:
    yield from _service("router", tmp_path_factory)


def test_generation_is_reproducible() -> None:
    ep = fuzz.extender_endpoints("default.chat", ["n0", "n1"])[0]
    assert fuzz.generate(ep, 50, seed=3) == fuzz.generate(ep, 50, seed=3)
    assert fuzz.generate(ep, 50, seed=3) != fuzz.generate(ep, 50, seed=4)


def test_generated_bodies_include_the_hostile_shapes() -> None:
    """The generator reaches what the audit found: huge quantities, NaN, deep nesting,
    wrong content types."""
    ep = fuzz.extender_endpoints("default.chat", ["n0", "n1"])[0]
    reqs = fuzz.generate(ep, 2000, seed=SEED)
    bodies = [r.body or b"" for r in reqs]
    assert any(b'"1e999999"' in b or b"1e999999" in b for b in bodies)
    assert any(b"NaN" in b for b in bodies)
    assert any(b"[" * 1000 in b for b in bodies)
    assert any(r.headers.get("Content-Type") == "text/plain" for r in reqs)


async def test_every_extender_endpoint_survives_the_fuzzer(
        extender: tuple[str, list[str]]) -> None:
    base, names = extender
    endpoints = fuzz.extender_endpoints("default.chat", names[:12])
    report = await fuzz.run(base, endpoints, PER_ENDPOINT, SEED, concurrency=8,
                            max_latency_s=1.0)
    assert report.total == PER_ENDPOINT * len(endpoints)
    assert report.ok, report.describe_violations()
    by_name = {r.name: r for r in report.results}
    # the mutations are plausible enough to be served, not only refused
    for name in ("filter", "prioritize"):
        statuses = by_name[name].statuses
        assert statuses[200] > 0 and sum(v for k, v in statuses.items() if 400 <= k < 500) > 0, \
            (name, statuses)


async def test_every_router_endpoint_survives_the_fuzzer(router: tuple[str, list[str]]) -> None:
    base, _ = router
    endpoints = fuzz.router_endpoints("default.chat")
    report = await fuzz.run(base, endpoints, PER_ENDPOINT, SEED, concurrency=8,
                            max_latency_s=1.0)
    assert report.total == PER_ENDPOINT * len(endpoints)
    assert report.ok, report.describe_violations()
    by_name = {r.name: r for r in report.results}
    for name in ("route", "complete"):
        statuses = by_name[name].statuses
        assert statuses[200] > 0 and sum(v for k, v in statuses.items() if 400 <= k < 500) > 0, \
            (name, statuses)
