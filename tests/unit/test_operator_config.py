"""Operator settings: what reaches kopf must be what kube-apiserver accepts."""

from __future__ import annotations

import pytest

from joulepool.operator.app import make_settings
from joulepool.operator.config import OperatorConfig


def test_watch_server_timeout_is_a_whole_number_of_seconds() -> None:
    # kopf sends str(server_timeout) as the watch's timeoutSeconds; kube-apiserver parses
    # it with strconv.ParseInt and answers "300.0" with 400 (the operator then exits)
    settings = make_settings(OperatorConfig(namespace="ops"))
    assert str(settings.watching.server_timeout) == "300"


@pytest.mark.parametrize("bad", [300.0, 0.5, 0, -1, True])
def test_watch_server_timeout_rejects_what_the_api_server_would(bad: object) -> None:
    with pytest.raises(ValueError, match="whole number of seconds"):
        OperatorConfig(namespace="ops", watch_server_timeout=bad)  # type: ignore[arg-type]


def test_liveness_binds_the_configured_address_never_all_interfaces() -> None:
    import argparse

    from joulepool.operator.app import liveness_endpoint
    from joulepool.operator.cli import config_from_args, configure

    parser = argparse.ArgumentParser()
    configure(parser)
    default = config_from_args(parser.parse_args([]))
    assert isinstance(default, OperatorConfig) and default.liveness_address == "127.0.0.1"
    pod = config_from_args(parser.parse_args(["--liveness-address", "10.1.2.3"]))
    assert isinstance(pod, OperatorConfig) and pod.liveness_address == "10.1.2.3"
    assert liveness_endpoint("10.1.2.3", 8080) == "http://10.1.2.3:8080/healthz"
    assert liveness_endpoint("fd00::5", 8080) == "http://[fd00::5]:8080/healthz"


def test_kopf_never_posts_events_about_cluster_scoped_objects() -> None:
    """kopf posts an event about a cluster-scoped object in its context's namespace and
    names that namespace in involvedObject, where ``kubectl describe`` never finds it
    (nolar/kopf#949; kopf has no setting for it). It posts only for changing and
    spawning handlers (create/update/delete/resume, timers, daemons) and kopf.warn &c.;
    on.event and index failures it only logs. So cluster-scoped kinds get those alone,
    and joulepool.operator.events posts their Warnings in ``default`` itself."""
    from joulepool.operator import handlers

    cluster_scoped = {handlers.NODES[-1], handlers.PROFILES[-1], handlers.POLICIES[-1]}
    registry = handlers.registry
    posting = [h for reg in (registry._changing, registry._spawning)
               for h in reg.get_all_handlers()]
    assert {h.selector.any_name for h in posting} == {handlers.POOLS[-1]}
    watched = {h.selector.any_name for h in registry._watching.get_all_handlers()}
    assert cluster_scoped <= watched  # their changes still reach the planner
