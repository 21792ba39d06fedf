"""Settings layering (flags > env > config file > defaults) and the CLI's usage errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from joulepool.cli import main
from joulepool.extender.cli import configure
from joulepool.extender.settings import Settings, SettingsError, load_settings


def _parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    configure(p)
    return p.parse_args(list(argv))


def test_defaults() -> None:
    s = load_settings(_parse(), environ={})
    assert (s.port, s.prefix, s.cluster, s.token_scope) == (8888, "/scheduler", True, "all")
    assert s.max_body_bytes == 32 << 20


def test_fresh_read_limits_are_settings() -> None:
    from joulepool.extender import freshness

    s = load_settings(_parse(), environ={})
    assert (s.fresh_read_timeout_seconds, s.fresh_read_max_nodes,
            s.fresh_read_min_interval_seconds, s.fresh_reads_per_second) == (
        freshness.DEFAULT_TIMEOUT_S, freshness.DEFAULT_MAX_NODES,
        freshness.DEFAULT_MIN_INTERVAL_S, freshness.DEFAULT_READS_PER_SECOND)
    s = load_settings(_parse("--fresh-read-max-nodes", "3"), environ={
        "JOULEPOOL_EXTENDER_FRESH_READ_MIN_INTERVAL_SECONDS": "5",
        "JOULEPOOL_EXTENDER_FRESH_READS_PER_SECOND": "2.5"})
    assert (s.fresh_read_max_nodes, s.fresh_read_min_interval_seconds,
            s.fresh_reads_per_second) == (3, 5.0, 2.5)


def test_precedence_flag_over_env_over_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("port: 9000\nprefix: /from-file\nmax-nodes: 7\nhard_deadline: true\n")
    env = {"JOULEPOOL_EXTENDER_PORT": "9100", "JOULEPOOL_EXTENDER_PREFIX": "/from-env"}
    s = load_settings(_parse("--config", str(cfg), "--port", "9200"), environ=env)
    assert (s.port, s.prefix, s.max_nodes, s.hard_deadline) == (9200, "/from-env", 7, True)
    s = load_settings(_parse("--no-hard-deadline"), environ={
        "JOULEPOOL_EXTENDER_CONFIG": str(cfg), "JOULEPOOL_EXTENDER_CLUSTER": "false"})
    assert s.hard_deadline is False and s.cluster is False and s.port == 9000


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        (["--port", "70000"], {}, "--port"),
        (["--port", "eighty"], {}, "--port"),
        ([], {"JOULEPOOL_EXTENDER_PORT": "-1"}, "JOULEPOOL_EXTENDER_PORT"),
        ([], {"JOULEPOOL_EXTENDER_NO_SUCH": "1"}, "unknown environment variable"),
        (["--tls-cert", "/etc/hostname"], {}, "go together"),
        (["--prefix", "scheduler"], {}, "prefix"),
        (["--plan-file", "/nonexistent/plan.json"], {}, "no such file"),
        (["--lambda-min", "5", "--lambda-max", "1"], {}, "lambda-min"),
        (["--token-scope", "everything"], {}, "--token-scope"),
        (["--fresh-read-timeout-seconds", "inf"], {}, "--fresh-read-timeout-seconds"),
        (["--fresh-read-max-nodes", "0"], {}, "--fresh-read-max-nodes"),
        ([], {"JOULEPOOL_EXTENDER_FRESH_READ_MIN_INTERVAL_SECONDS": "-1"},
         "JOULEPOOL_EXTENDER_FRESH_READ_MIN_INTERVAL_SECONDS"),
        (["--fresh-reads-per-second", "0"], {}, "--fresh-reads-per-second"),
        (["--fresh-reads-per-second", "nan"], {}, "--fresh-reads-per-second"),
    ],
)
def test_bad_values_name_their_source(argv: list[str], env: dict[str, str], needle: str) -> None:
    with pytest.raises(SettingsError, match=needle):
        load_settings(_parse(*argv), environ=env)


def test_config_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("nope: 1\n")
    with pytest.raises(SettingsError, match="unknown setting 'nope'"):
        load_settings(_parse("--config", str(bad)), environ={})
    bad.write_text("- a list\n")
    with pytest.raises(SettingsError, match="mapping"):
        load_settings(_parse("--config", str(bad)), environ={})
    with pytest.raises(SettingsError, match="cannot read"):
        load_settings(_parse("--config", str(tmp_path / "missing.yaml")), environ={})


def test_cli_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["extender", "--port", "nope"]) == 2
    assert "--port" in capsys.readouterr().err
    assert main(["extender", "--no-cluster"]) == 2
    assert "--no-cluster needs" in capsys.readouterr().err
    broken = tmp_path / "plan.json"
    broken.write_text("{not json")
    assert main(["extender", "--no-cluster", "--plan-file", str(broken)]) == 2
    assert "plan.json" in capsys.readouterr().err
    missing_kube = tmp_path / "kubeconfig"
    missing_kube.write_text("apiVersion: v1\nkind: Config\n")
    assert main(["extender", "--kubeconfig", str(missing_kube)]) == 2
    assert "Kubernetes configuration" in capsys.readouterr().err


def test_every_setting_has_a_flag_and_help() -> None:
    p = argparse.ArgumentParser()
    configure(p)
    text = p.format_help()
    for name, field in Settings.model_fields.items():
        assert "--" + name.replace("_", "-") in text
        assert field.description, name
