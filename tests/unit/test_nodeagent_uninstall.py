"""The uninstall hooks' waits (agents gone, reset DaemonSet Ready) and ``--hold``."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from types import SimpleNamespace as NS

from joulepool.nodeagent.uninstall import daemonset_not_ready, pods_left, wait_until

PY = [sys.executable, "-c", "import sys; from joulepool.cli import main; sys.exit(main())"]


class Api:
    def __init__(self, pods=(), ds=None) -> None:
        self.pods = list(pods)
        self.ds = ds
        self.kwargs: list[dict] = []

    def list_namespaced_pod(self, namespace, **kw):
        self.kwargs.append(kw)
        return NS(items=[NS(metadata=NS(name=p)) for p in self.pods])

    def read_namespaced_daemon_set_status(self, name, namespace, **kw):
        self.kwargs.append(kw)
        return self.ds


def ds(generation=1, observed=1, want=3, ready=3, updated=3):
    return NS(metadata=NS(generation=generation),
              status=NS(observed_generation=observed, desired_number_scheduled=want,
                        number_ready=ready, updated_number_scheduled=updated))


def test_pods_left_and_daemonset_readiness():
    api = Api(pods=["b", "a"])
    assert pods_left(api, "ns", "x=y") == ["a", "b"]
    assert daemonset_not_ready(Api(ds=ds()), "ns", "r") is None
    assert daemonset_not_ready(Api(ds=ds(want=0, ready=0, updated=0)), "ns", "r") is None
    assert daemonset_not_ready(Api(ds=ds(ready=2)), "ns", "r") == "2 of 3 node(s) reset"
    assert daemonset_not_ready(Api(ds=ds(updated=1)), "ns", "r") is not None
    assert daemonset_not_ready(Api(ds=ds(generation=2)), "ns", "r") == "status not observed yet"
    assert all(kw.get("_request_timeout") for kw in api.kwargs)


def test_wait_until_polls_survives_api_errors_and_times_out(capsys):
    answers = iter([RuntimeError("503"), "1 of 2 node(s) reset", None])
    t = {"now": 0.0}

    def check():
        a = next(answers)
        if isinstance(a, Exception):
            raise a
        return a

    def sleep(s):
        t["now"] += s

    assert wait_until(check, 60.0, "reset", sleep=sleep, monotonic=lambda: t["now"])
    assert wait_until(lambda: "0 of 2 node(s) reset", 5.0, "reset", sleep=sleep,
                      monotonic=lambda: t["now"]) is False
    err = capsys.readouterr().err
    assert "timed out after 5 s (0 of 2 node(s) reset)" in err


def test_hold_waits_for_sigterm_then_exits_0():
    proc = subprocess.Popen([*PY, "node-agent", "--hold"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    assert "holding until SIGTERM" in proc.stdout.readline()
    time.sleep(0.2)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
