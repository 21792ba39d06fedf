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
