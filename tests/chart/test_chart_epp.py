"""The chart's GIE endpoint picker: the router's gRPC port and args, the picker Service the
operator names in GIE pools' endpointPickerRef, and turning it off."""

from __future__ import annotations

from typing import Any

from chartlib import Rendered, name, render_raw

from joulepool.api.contract import EPP_PORT
from joulepool.operator.settings import OperatorSettings
from joulepool.router.settings import Settings as RouterSettings


def _container(render: Rendered, component: str) -> dict[str, Any]:
    deployment = render.get("Deployment", name(component))
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(c)


def _arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_picker_service_targets_the_routers_grpc_port(default_render: Rendered) -> None:
    svc = default_render.get("Service", name("epp"))
    (port,) = svc["spec"]["ports"]
    assert port["port"] == EPP_PORT and port["targetPort"] == "grpc"
    assert port["appProtocol"] == "kubernetes.io/h2c"  # gRPC without TLS
    router = default_render.get("Deployment", name("router"))
    pod_labels = router["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    c = _container(default_render, "router")
    assert {"name": "grpc", "containerPort": EPP_PORT, "protocol": "TCP"} in c["ports"]
    assert int(_arg(c["args"], "--epp-port")) == EPP_PORT
    assert _arg(c["args"], "--picker-front-end") == "auto"
    known = {f"--{f.replace('_', '-')}" for f in RouterSettings.model_fields}
    assert {"--epp-port", "--picker-front-end"} <= known


def test_operator_names_the_picker_service(default_render: Rendered) -> None:
    args = _container(default_render, "operator")["args"]
    assert _arg(args, "--epp-service") == name("epp")
    assert int(_arg(args, "--epp-port")) == EPP_PORT
    assert _arg(args, "--epp-failure-mode") == "FailClose"
    known = {f"--{f.replace('_', '-')}" for f in OperatorSettings.model_fields}
    assert {"--epp-service", "--epp-port", "--epp-failure-mode"} <= known


def test_picker_off_renders_no_service_and_no_args() -> None:
    render = Rendered(render_raw({"router": {"epp": {"enabled": False}}}))
    assert not [s for s in render.all("Service") if s["metadata"]["name"] == name("epp")]
    assert "--epp-port" not in _container(render, "router")["args"]
    assert "--picker-front-end" not in _container(render, "router")["args"]
    assert "--epp-service" not in _container(render, "operator")["args"]


def _schema_rejects(epp: dict[str, str]) -> None:
    """The chart's values schema refuses ``router.epp: epp``, naming the field."""
    (field, value), = epp.items()
    try:
        render_raw({"router": {"epp": epp}})
    except Exception as exc:  # the Helm engine's schema error
        assert field in str(exc)
    else:
        raise AssertionError(f"the schema accepted {field}: {value}")


def test_failure_mode_is_validated_by_the_schema() -> None:
    render = Rendered(render_raw({"router": {"epp": {"failureMode": "FailOpen"}}}))
    assert _arg(_container(render, "operator")["args"], "--epp-failure-mode") == "FailOpen"
    _schema_rejects({"failureMode": "Sometimes"})


def test_front_end_is_passed_and_validated_by_the_schema() -> None:
    render = Rendered(render_raw({"router": {"epp": {"frontEnd": "python"}}}))
    assert _arg(_container(render, "router")["args"], "--picker-front-end") == "python"
    assert RouterSettings(picker_front_end="python").picker_front_end == "python"
    _schema_rejects({"frontEnd": "rust"})
