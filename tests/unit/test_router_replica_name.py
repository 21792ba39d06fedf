"""The router replica's default name (its host name) becomes a valid Lease name: a
DNS-1123 subdomain, as the API server's validation (IsDNS1123Subdomain) requires."""

from __future__ import annotations

import re

import pytest

from joulepool.router import replicas
from joulepool.router.settings import load_settings

#: k8s.io/apimachinery/pkg/util/validation IsDNS1123Subdomain, and its length limit
LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
SUBDOMAIN = re.compile(rf"{LABEL}(\.{LABEL})*")


@pytest.mark.parametrize(("host", "name"), [
    ("router-7d9f-abcde", "router-7d9f-abcde"),
    ("My_Host", "my-host"),
    ("_gpu_box_", "gpu-box"),
    ("Node-1.Example.COM", "node-1.example.com"),
    ("a..b.-c-.", "a.b.c"),
    ("host name with spaces!", "host-name-with-spaces"),
    ("___", "joulepool-router"),
    ("", "joulepool-router"),
])
def test_host_name_becomes_a_dns_subdomain(host: str, name: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replicas.socket, "gethostname", lambda: host)
    assert replicas.replica_name(None) == name
    assert SUBDOMAIN.fullmatch(name) and len(name) <= 253
    # and the --replica-name setting accepts it too
    assert load_settings(environ={"JOULEPOOL_ROUTER_REPLICA_NAME": name}).replica_name == name


def test_long_host_names_are_cut_to_253_ending_alphanumeric() -> None:
    for text in ("a" * 252 + "-b", "a" * 252 + ".b", "x" * 300, ("ab." * 100)):
        name = replicas.dns_subdomain(text, fallback="f")
        assert len(name) <= 253 and SUBDOMAIN.fullmatch(name), name


def test_a_configured_name_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replicas.socket, "gethostname", lambda: "My_Host")
    assert replicas.replica_name("router-0") == "router-0"
