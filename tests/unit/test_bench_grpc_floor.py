"""``joulepool bench grpc_floor``: the variants are the servers they name, and a short
run measures each (no timing asserted: the figures are the benchmark's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_helpers import load_bench

from joulepool.router import epp


@pytest.fixture(scope="module")
def bench():
    yield from load_bench("bench_grpc_floor.py")


def test_variants_are_the_servers_they_name(bench) -> None:
    picker = bench.variant("picker", 0)
    assert picker.options == list(epp.SERVER_OPTIONS) and picker.close
    defaults = bench.variant("defaults", 0)
    assert defaults.options is None and not defaults.close
    assert ("grpc.enable_channelz", 0) not in bench.variant("channelz-on", 0).options
    assert not bench.variant("wait-eof", 0).close
    assert bench.variant("one-cpu", 1).cpu == 1
    assert bench.variant("asyncio-loop", 0).loop == "asyncio"
    assert ("grpc.http2.bdp_probe", 0) in bench.variant("grpc.http2.bdp_probe=0", 0).options
    assert bench.variant("env:GRPC_POLL_STRATEGY=poll", 0).env == {
        "GRPC_POLL_STRATEGY": "poll"}
    with pytest.raises(ValueError, match="unknown variant"):
        bench.variant("nope", 0)
    assert bench.main(["--variants", "nope"]) == 2


def test_every_variant_server_refuses_a_port_another_holds(bench) -> None:
    # grpcio's default SO_REUSEPORT would let two floors share one port unseen
    assert bench._with_no_shared_port(None) == [epp.NO_SHARED_PORT]
    assert bench._with_no_shared_port(list(epp.SERVER_OPTIONS)) == list(epp.SERVER_OPTIONS)
    assert bench._with_no_shared_port([["grpc.so_reuseport", 1]]) == [
        ("grpc.so_reuseport", 1)]


def test_a_short_run_measures_every_variant(bench, tmp_path: Path) -> None:
    out = tmp_path / "floor.json"
    assert bench.main(["--rounds", "1", "--seconds", "0.3", "--variants",
                       "picker,defaults", "--out", str(out)]) == 0
    med = json.loads(out.read_text())["median"]
    assert set(med) == {"picker", "defaults"}
    assert all(full > 0 and req_only > 0 for full, req_only in med.values())
