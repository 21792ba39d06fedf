"""Waits of the chart's uninstall hooks: agents gone, then every node's clocks reset.

``helm uninstall`` deletes the node agent DaemonSet; each agent resets its
GPUs on SIGTERM (retrying within its grace period). A reset that still fails
there would leave a GPU locked for good, so the chart's ``post-delete`` hooks
run, in order (hook weights):

1. a Job ``node-agent --await-pods-gone SELECTOR``: until every agent pod has
   exited (no reset pod may run while an agent still holds the GPUs);
2. a DaemonSet on the agents' nodes whose pods run ``node-agent
   --reset-and-exit`` as an init container (it exits non-zero, and is retried
   by the kubelet with backoff, until the node's GPUs are reset) and then
   hold (``--reset-and-exit --hold``), so a pod is Ready only once its node
   is reset;
3. a Job ``node-agent --await-daemonset NAME``: until that DaemonSet has a
   Ready pod on every node it should run on. Helm waits for hook Jobs, not for
   DaemonSets, hence this Job; if it times out, the uninstall fails and says
   which nodes are not reset.

Both waits read the API with a bounded timeout per call and exit 0 when the
condition holds, 1 on timeout.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from typing import Any

from joulepool.cli import UsageError
from joulepool.nodeagent.background import API_TIMEOUT
from joulepool.nodeagent.settings import NodeAgentSettings

POLL_S = 2.0


def pods_left(core: Any, namespace: str, selector: str) -> list[str]:
    """Names of the pods matching ``selector`` in ``namespace``."""
    pods = core.list_namespaced_pod(namespace, label_selector=selector,
                                    _request_timeout=API_TIMEOUT)
    return sorted(p.metadata.name for p in pods.items)


def daemonset_not_ready(apps: Any, namespace: str, name: str) -> str | None:
    """None when the DaemonSet's current pods are Ready on every node it should run on,
    else what is missing."""
    ds = apps.read_namespaced_daemon_set_status(name, namespace, _request_timeout=API_TIMEOUT)
    st = ds.status
    if st is None or (st.observed_generation or 0) < (ds.metadata.generation or 0):
        return "status not observed yet"
    want = st.desired_number_scheduled or 0
    ready = st.number_ready or 0
    updated = st.updated_number_scheduled or 0
    if want == 0 or (ready >= want and updated >= want):
        return None
    return f"{ready} of {want} node(s) reset"


def wait_until(check: Callable[[], str | None], timeout_s: float, what: str,
               sleep: Callable[[float], None] = time.sleep,
               monotonic: Callable[[], float] = time.monotonic) -> bool:
    """Poll ``check`` (None: done, else what is missing) until done or ``timeout_s``."""
    deadline = monotonic() + timeout_s
    missing = "not checked"
    while True:
        try:
            result = check()
        except Exception as exc:  # API hiccup: keep waiting, report it if it lasts
            result = f"API error: {exc}"
        if result is None:
            print(f"joulepool node-agent: {what}: done", flush=True)
            return True
        missing = result
        if monotonic() >= deadline:
            print(f"joulepool node-agent: error: {what}: timed out after {timeout_s:g} s "
                  f"({missing})", file=sys.stderr, flush=True)
            return False
        sleep(min(POLL_S, max(deadline - monotonic(), 0.0)))


def hold() -> int:
    """Wait for SIGTERM / SIGINT, then return 0."""
    import signal

    got: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: got.append(signum))
    print("joulepool node-agent: holding until SIGTERM", flush=True)
    while not got:
        signal.pause()
    return 0


def run_await(args: NodeAgentSettings) -> int:
    from kubernetes import client

    from joulepool.nodeagent.runner import load_kube_config

    try:
        load_kube_config()
    except Exception as exc:
        raise UsageError(f"cannot configure the Kubernetes client: {exc}") from None
    ok = True
    if args.await_pods_gone:
        core = client.CoreV1Api()
        selector = args.await_pods_gone
        ok = wait_until(
            lambda: (f"still running: {', '.join(left)}"
                     if (left := pods_left(core, args.namespace, selector)) else None),
            args.await_timeout, f"node agent pods ({selector}) gone")
    if ok and args.await_daemonset:
        apps = client.AppsV1Api()
        for name in [n for n in args.await_daemonset.split(",") if n]:
            ok = ok and wait_until(
                functools.partial(daemonset_not_ready, apps, args.namespace, name),
                args.await_timeout, f"GPU clocks reset on every node ({name})")
    return 0 if ok else 1
