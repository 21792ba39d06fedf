"""The compiled ext_proc front end's jobs fail one at a time: a job that throws a C++
exception (here std::bad_alloc, the one the front end can meet) ends its own stream
with the answer of a failed pick, and the other jobs of the same batch (the picks the
event loop runs in one ``drain()``) still run and answer their streams.

The server runs in a child process with a fake bridge: the pick of the request whose
body is ``huge`` returns a destination of 128 MiB and lowers the child's address-space
limit (RLIMIT_AS) to what it uses plus 32 MiB just before, so the C++ side's copy of
that destination cannot be allocated; every other pick restores the limit first.
``huge`` is sent alone first, and the child reports when the server has queued a job
(its event fd readable: that pick, as nothing else was sent); only then are the others
sent, and the child drains once this side has sent every request, so that their picks
are queued together, ``huge`` first. The child reports what it saw as JSON, and the
test checks that this setup happened (otherwise it would not test a batch).

The jobs left when a server is dropped (deallocated) still run, and an exception being
raised at that moment survives them.
"""

from __future__ import annotations

import json
import queue
import select
import subprocess
import sys
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from joulepool.router import epp_native

pytestmark = pytest.mark.skipif(epp_native.UNAVAILABLE is not None,
                                reason=str(epp_native.UNAVAILABLE))

DEST = "x-gateway-destination-endpoint"
#: a stream's deadline: generous, a loaded machine included; a stream whose pick was
#: dropped ends with DEADLINE_EXCEEDED after it
DEADLINE_S = 60.0

CHILD = r"""
import json, os, resource, select, sys
from joulepool.router import epp_native

BIG = "x" * (128 << 20)
_, HARD = resource.getrlimit(resource.RLIMIT_AS)
drains, picks, closed, failures = 0, [], [], []


def unlimited():
    resource.setrlimit(resource.RLIMIT_AS, (HARD, HARD))


def address_space():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


class Exchange:
    def __init__(self, name):
        self.name = name

    def close(self):
        closed.append(self.name)

    def response(self, status, content_type, chunk, end):
        if end:
            closed.append(self.name)

    def served(self, address):
        pass


class Bridge:
    def pick(self, headers, body, subset):
        unlimited()
        name = body.decode()
        picks.append([drains, name])
        if name != "huge":
            return Exchange(name), "10.0.0.1:8000"
        resource.setrlimit(resource.RLIMIT_AS, (address_space() + (32 << 20), HARD))
        return Exchange(name), BIG


server = epp_native.new_server(Bridge(), "127.0.0.1", 0)
print(server.port, flush=True)
queued, _, _ = select.select([server.fileno()], [], [], 60.0)
print("queued" if queued else "nothing queued", flush=True)  # huge's pick, alone
sys.stdin.readline()  # every request sent: their picks are queued
while True:
    drains += 1
    try:
        server.drain()
    except Exception as e:
        failures.append(type(e).__name__)
    finally:
        unlimited()
    ready, _, _ = select.select([server.fileno(), sys.stdin], [], [], 60.0)
    if sys.stdin in ready or not ready:
        break
server.shutdown(0.0)
server.close()
print(json.dumps({"picks": picks, "closed": closed, "failures": failures}), flush=True)
"""


def _headers() -> pb.ProcessingRequest:
    pairs = {":method": "POST", ":path": "/v1/completions", ":authority": "gw",
             "content-type": "application/json"}
    return pb.ProcessingRequest(request_headers=pb.HttpHeaders(
        headers=base_pb2.HeaderMap(headers=[
            base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()])))


def _stream(stub: Any, body: bytes | None) -> tuple[queue.Queue[Any], Any]:
    """A stream whose request headers were answered "continue", then its body sent
    (``body`` None: none yet); its request queue (None ends it) and replies."""
    requests: queue.Queue[Any] = queue.Queue()
    replies = stub.Process(iter(requests.get, None), timeout=DEADLINE_S)
    requests.put(_headers())
    assert next(replies).HasField("request_headers")
    if body is not None:
        requests.put(pb.ProcessingRequest(request_body=pb.HttpBody(body=body,
                                                                   end_of_stream=True)))
    return requests, replies


def test_a_job_that_throws_fails_alone_and_the_rest_of_its_batch_runs() -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    try:
        port = int(child.stdout.readline())
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ExternalProcessorStub(channel)
            streams = {"huge": _stream(stub, b"huge")}
            assert child.stdout.readline().strip() == "queued"  # huge's pick, first
            streams |= {name: _stream(stub, name.encode()) for name in ("first", "second")}
            # a later stream's headers answered: the bodies sent before have most likely
            # reached the server (their picks queued; checked at the end)
            marker, _ = _stream(stub, None)
            child.stdin.write("go\n")
            child.stdin.flush()
            with pytest.raises(grpc.RpcError) as failed:
                next(streams["huge"][1])
            assert failed.value.code() == grpc.StatusCode.UNKNOWN, failed.value
            for name in ("first", "second"):
                answer = next(streams[name][1])
                header = [o.header.raw_value for o in
                          answer.request_body.response.header_mutation.set_headers
                          if o.header.key == DEST]
                assert header == [b"10.0.0.1:8000"], (name, answer)
            for requests, _ in (*streams.values(), (marker, None)):
                requests.put(None)
            for name in ("first", "second"):  # their streams end: the exchanges close
                assert list(streams[name][1]) == []
        child.stdin.write("stop\n")
        child.stdin.flush()
        out, _ = child.communicate(timeout=DEADLINE_S)
    finally:
        child.kill()
        child.wait()
    seen = json.loads(out.strip().splitlines()[-1])
    # drain() raised the job's MemoryError once, after running the whole batch
    assert seen["failures"] == ["MemoryError"], seen
    assert sorted(seen["closed"]) == ["first", "huge", "second"], seen
    # the setup: one batch, huge first (else the test did not test a batch's isolation)
    picks = seen["picks"]
    assert picks[:1] == [[1, "huge"]] and sorted(picks[1:]) == [[1, "first"], [1, "second"]], (
        "the test did not set up its batch (the three picks in one drain, huge first):",
        seen)


def test_a_server_dropped_while_an_exception_is_raised_keeps_that_exception() -> None:
    # Server_dealloc runs the jobs left (here an exchange's close) with the exception
    # being raised put aside: the close runs as usual, and the exception goes on
    closed: list[str] = []

    class Exchange:
        def close(self) -> None:
            closed.append(repr(sys.exc_info()[1]))

    class Bridge:
        def pick(self, headers: Any, body: bytes, subset: Any) -> tuple[Exchange, str]:
            return Exchange(), "10.0.0.1:8000"

    servers = [epp_native.new_server(Bridge(), "127.0.0.1", 0)]
    fd = servers[0].fileno()
    with grpc.insecure_channel(f"127.0.0.1:{servers[0].port}") as channel:
        requests, replies = _stream(pb_grpc.ExternalProcessorStub(channel), b"body")
        assert select.select([fd], [], [], DEADLINE_S)[0], "the pick was not queued"
        servers[0].drain()
        assert next(replies).HasField("request_body")
        requests.put(None)  # the stream ends: its exchange's close is queued
        assert list(replies) == []
        assert select.select([fd], [], [], DEADLINE_S)[0], "the close was not queued"

    def key(i: int) -> Any:  # list.sort drops the keys made so far with the error set
        if i:
            raise ValueError("in flight")
        return servers.pop()

    with pytest.raises(ValueError, match="in flight"):
        sorted([0, 1], key=key)
    assert closed == ["None"]
