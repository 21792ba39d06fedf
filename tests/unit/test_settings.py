"""One configuration mechanism: every component's settings layer flags > env > file > defaults,
and a bad value anywhere is exit code 2 with a message naming the flag, variable or file key."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from joulepool.cli import main
from joulepool.extender.settings import Settings as ExtenderSettings
from joulepool.fakes.settings import DevicePluginSettings, FakeEngineSettings
from joulepool.nodeagent.settings import NodeAgentSettings
from joulepool.operator.settings import OperatorSettings
from joulepool.router.settings import Settings as RouterServiceSettings
from joulepool.settings import ComponentSettings, SettingsError, add_arguments, load

#: command, its settings model, a float/int setting, and a value the model rejects
COMPONENTS = [
    ("extender", ExtenderSettings, "port", "70000"),
    ("router", RouterServiceSettings, "port", "70000"),
    ("node-agent", NodeAgentSettings, "interval", "-1"),
    ("fake-engine", FakeEngineSettings, "port", "70000"),
    ("device-plugin", DevicePluginSettings, "watch_interval", "0"),
    ("operator", OperatorSettings, "debounce_seconds", "-0.5"),
]
IDS = [c[0] for c in COMPONENTS]


def _parse(model: type[ComponentSettings], *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser, model)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(("command", "model", "name", "bad"), COMPONENTS, ids=IDS)
def test_bad_env_value_is_exit_2_naming_the_variable(
    command: str, model: type[ComponentSettings], name: str, bad: str,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    var = model.env_names(name)[0]
    monkeypatch.setenv(var, bad)
    assert main([command]) == 2
    err = capsys.readouterr().err
    assert var in err and repr(bad) in err, err
    monkeypatch.setenv(var, "not-a-number")
    assert main([command]) == 2
    assert var in capsys.readouterr().err


@pytest.mark.parametrize(("command", "model", "name", "bad"), COMPONENTS, ids=IDS)
def test_bad_file_value_names_the_file_and_key(
    command: str, model: type[ComponentSettings], name: str, bad: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"{name.replace('_', '-')}: {bad}\n")
    with pytest.raises(SettingsError, match=f"{cfg}: {name.replace('_', '-')}"):
        load(model, _parse(model, "--config", str(cfg)), environ={})
    assert main([command, "--config", str(cfg)]) == 2
    assert str(cfg) in capsys.readouterr().err


@pytest.mark.parametrize(("command", "model", "name", "bad"), COMPONENTS, ids=IDS)
def test_precedence_flags_env_file_defaults(
    command: str, model: type[ComponentSettings], name: str, bad: str, tmp_path: Path,
) -> None:
    flag = "--" + name.replace("_", "-")
    var = model.env_names(name)[0]
    default = model.model_fields[name].default
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"{name}: 3\n")
    assert getattr(load(model, _parse(model), environ={}), name) == default
    assert getattr(load(model, _parse(model, "--config", str(cfg)), environ={}), name) == 3
    env = {var: "4", model.CONFIG_ENV: str(cfg)}
    assert getattr(load(model, _parse(model), environ=env), name) == 4  # env over file
    assert getattr(load(model, _parse(model, flag, "5"), environ=env), name) == 5  # flag wins
    assert getattr(load(model, _parse(model), environ={var: ""}), name) == default  # "" = unset


@pytest.mark.parametrize("model", [c[1] for c in COMPONENTS], ids=IDS)
def test_every_setting_has_a_flag_a_variable_and_a_description(
    model: type[ComponentSettings],
) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, model)
    text = parser.format_help()
    for name, field in model.model_fields.items():
        assert field.description, name
        assert "--" + name.replace("_", "-") in text
        assert model.env_names(name)[0] in text


def test_chart_variable_names_still_work() -> None:
    # names the Helm chart, kind manifests and the device plugin's Allocate set
    a = load(NodeAgentSettings, None, environ={
        "NODE_NAME": "n1", "POD_NAMESPACE": "ops", "JOULEPOOL_MIAD_K_INC": "2",
        "JOULEPOOL_ENGINE_URLS": "0@http://a:8000; 1,2@http://b:8000"})
    assert (a.node, a.namespace, a.k_inc) == ("n1", "ops", 2.0)
    assert a.engine_url == ["0@http://a:8000", "1,2@http://b:8000"]
    assert load(NodeAgentSettings, None, environ={
        "NODE_NAME": "n1", "JOULEPOOL_NODE": "n2"}).node == "n2"  # the first name wins
    e = load(FakeEngineSettings, None, environ={"JOULEPOOL_GPU_INDEX": "1,0",
                                                 "JOULEPOOL_GPU_STATE": "/s.json"})
    assert e.gpu_index == [0, 1] and e.gpu_state == "/s.json"
    o = load(OperatorSettings, None, environ={"WATCH_NAMESPACE": "a, b,a",
                                              "JOULEPOOL_SCHEDULER": "s"})
    assert o.watch_namespace == ["a", "b"] and o.scheduler_name == "s"


def test_unknown_variable_of_a_component_prefix_is_rejected() -> None:
    with pytest.raises(SettingsError, match="JOULEPOOL_EXTENDER_PROT"):
        load(ExtenderSettings, None, environ={"JOULEPOOL_EXTENDER_PROT": "1"})
    # the shared JOULEPOOL_ prefix is not strict: other components' variables pass
    load(NodeAgentSettings, None, environ={"JOULEPOOL_EXTENDER_PORT": "1"})


def test_bad_boolean_and_choice_name_their_variable() -> None:
    with pytest.raises(SettingsError, match="JOULEPOOL_PUBLISH='maybe'"):
        load(NodeAgentSettings, None, environ={"JOULEPOOL_PUBLISH": "maybe"})
    with pytest.raises(SettingsError, match="JOULEPOOL_BACKEND"):
        load(NodeAgentSettings, None, environ={"JOULEPOOL_BACKEND": "cuda"})


@pytest.mark.parametrize("url", ["notaurl", "127.0.0.1:9400/metrics", "http://", "http:///m",
                                 "ftp://host/metrics", "http://host:port/metrics"])
def test_router_energy_metrics_urls_must_be_http_urls(
    url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    # anything else was accepted, then counted as a failed scrape forever
    assert main(["router", "--no-cluster", "--energy-metrics-urls", url]) == 2
    assert "--energy-metrics-urls" in (err := capsys.readouterr().err) and repr(url) in err, err
    monkeypatch.setenv("JOULEPOOL_ROUTER_ENERGY_METRICS_URLS", f"http://ok/metrics {url}")
    with pytest.raises(SettingsError, match=f"JOULEPOOL_ROUTER_ENERGY_METRICS_URLS=.*{url}"):
        load(RouterServiceSettings, None)
    assert load(RouterServiceSettings, None, environ={
        "JOULEPOOL_ROUTER_ENERGY_METRICS_URLS": "http://127.0.0.1:9400/metrics "
        "https://dcgm.monitoring:9400/metrics"}).energy_metrics_urls == [
        "http://127.0.0.1:9400/metrics", "https://dcgm.monitoring:9400/metrics"]
