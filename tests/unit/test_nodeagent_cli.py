"""Flags of sidecar / fake-engine / device-plugin, and their JOULEPOOL_* environment twins."""

from __future__ import annotations

import pytest

from joulepool.cli import UsageError, build_parser, main
from joulepool.fakes.settings import DevicePluginSettings, FakeEngineSettings
from joulepool.nodeagent.runner import build_config
from joulepool.nodeagent.settings import NodeAgentSettings
from joulepool.settings import SettingsError, load

MODELS = {"sidecar": NodeAgentSettings, "node-agent": NodeAgentSettings,
          "fake-engine": FakeEngineSettings, "device-plugin": DevicePluginSettings}


def parse(argv, monkeypatch, **env):
    """The command's settings from flags and the (monkeypatched) environment."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return load(MODELS[argv[0]], build_parser().parse_args(argv))


def test_sidecar_defaults(monkeypatch):
    for k in ("JOULEPOOL_BACKEND", "JOULEPOOL_METRICS_PORT", "JOULEPOOL_INTERVAL",
              "JOULEPOOL_ENGINE_URLS", "NODE_NAME", "JOULEPOOL_NODE"):
        monkeypatch.delenv(k, raising=False)
    a = parse(["sidecar"], monkeypatch)
    assert (a.backend, a.metrics_port, a.interval) == ("nvml", 9400, 1.0)
    assert (a.k_inc, a.step_mhz, a.margin) == (1.5, 30.0, 0.1)
    assert a.engine_discovery == "auto" and a.publish is True
    assert a.engine_url == []


def test_sidecar_env_overrides_and_flags_win(monkeypatch):
    a = parse(["sidecar", "--interval", "0.5"], monkeypatch,
              JOULEPOOL_BACKEND="simulated", JOULEPOOL_INTERVAL="2",
              JOULEPOOL_METRICS_PORT="9500", JOULEPOOL_SIM_UNPRIVILEGED="true",
              JOULEPOOL_ENGINE_URLS="0@http://a:8000; 1,2@http://b:8000",
              JOULEPOOL_PUBLISH="false", JOULEPOOL_TTFT_SLO="0.5", JOULEPOOL_TPOT_SLO="0.05")
    assert a.backend == "simulated" and a.interval == 0.5 and a.metrics_port == 9500
    assert a.sim_unprivileged is True and a.publish is False
    assert a.engine_url == ["0@http://a:8000", "1,2@http://b:8000"]
    cfg = build_config(a, "n1")
    assert (cfg.ttft_slo_s, cfg.tpot_slo_s, cfg.node) == (0.5, 0.05, "n1")
    b = parse(["sidecar", "--engine-url", "http://c:1"], monkeypatch)
    assert b.engine_url == ["http://c:1"]  # the flag replaces env


@pytest.mark.parametrize("argv", [
    ["sidecar", "--tail-quantile", "0"],
    ["sidecar", "--ttft-slo", "1"],  # needs both
    ["sidecar", "--k-inc", "1.0"],
    ["sidecar", "--margin", "1.2"],
    ["sidecar", "--window", "-1"],
])
def test_sidecar_bad_values_are_usage_errors(argv, monkeypatch, capsys):
    monkeypatch.delenv("JOULEPOOL_TPOT_SLO", raising=False)
    monkeypatch.delenv("JOULEPOOL_TTFT_SLO", raising=False)
    with pytest.raises(SettingsError, match=argv[1]):
        parse(argv, monkeypatch)
    assert main(argv) == 2
    assert argv[1] in capsys.readouterr().err


def test_bad_boolean_env_is_a_usage_error(monkeypatch):
    with pytest.raises(SettingsError, match="JOULEPOOL_SIM_UNPRIVILEGED"):
        parse(["sidecar"], monkeypatch, JOULEPOOL_SIM_UNPRIVILEGED="maybe")


def test_agent_config_still_checks_what_it_is_given():
    # AgentConfig validates on its own too (MIAD's ranges), for callers without settings
    with pytest.raises(UsageError):
        build_config(NodeAgentSettings.model_construct(
            **{**NodeAgentSettings().model_dump(), "k_inc": 1.0}), "n")


def test_engine_and_plugin_flags(monkeypatch):
    e = parse(["fake-engine"], monkeypatch, JOULEPOOL_GPU_INDEX="0,1",
              JOULEPOOL_GPU_PRODUCT="L4", JOULEPOOL_GPU_STATE="/var/run/joulepool-gpu/s.json")
    assert (e.port, e.gpu_index, e.product, e.model) == (8000, [0, 1], "L4", "llama-3.1-8b")
    assert e.gpu_state == "/var/run/joulepool-gpu/s.json"
    d = parse(["device-plugin", "--count", "4"], monkeypatch, JOULEPOOL_GPU_PRODUCT="H100")
    assert (d.product, d.count, d.resource_name) == ("H100", 4, "nvidia.com/gpu")
    assert d.kubelet_dir == "/var/lib/kubelet/device-plugins"
