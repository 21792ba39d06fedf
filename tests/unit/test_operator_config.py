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
