"""Publishing J/token to GPUProfile status: matching, merging, rate limit."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from joulepool.api.models import GPUProfileStatus
from joulepool.nodeagent.publisher import KubeProfilePublisher, Measurement, RateLimited


class NotFound(Exception):
    status = 404


class FakeCustomObjects:
    def __init__(self, items) -> None:
        self.items = items
        self.patches: list[tuple] = []
        self.lists = 0
        self.gets: list[str] = []

    def list_cluster_custom_object(self, group, version, plural, **kw):
        assert kw.get("_request_timeout")
        assert (group, version, plural) == ("joulepool.dev", "v1alpha1", "gpuprofiles")
        self.lists += 1
        return {"items": self.items}

    def get_cluster_custom_object(self, group, version, plural, name, **kw):
        assert kw.get("_request_timeout")
        assert (group, version, plural) == ("joulepool.dev", "v1alpha1", "gpuprofiles")
        self.gets.append(name)
        for obj in self.items:
            if obj["metadata"]["name"] == name:
                return obj
        raise NotFound(name)

    def patch_cluster_custom_object_status(self, group, version, plural, name, body, **kw):
        assert kw.get("_request_timeout")
        self.patches.append((name, body))
        for obj in self.items:  # the API server applies it
            if obj["metadata"]["name"] == name:
                obj["status"] = body["status"]
        return body


def profile(name, product, model, gpus=1, measured=None, rv="7"):
    obj = {"metadata": {"name": name, "resourceVersion": rv},
           "spec": {"product": product, "model": model, "gpus": gpus}}
    if measured is not None:
        obj["status"] = {"measured": measured}
    return obj


NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def m(**kw) -> Measurement:
    base = dict(product="H100", model="llama-3.1-8b", gpus=1, joules_per_token=0.42,
                samples=1234, node="n1")
    base.update(kw)
    return Measurement(**base)


def test_patches_own_entry_and_keeps_other_nodes():
    api = FakeCustomObjects([
        profile("a100-8b", "A100", "llama-3.1-8b"),
        profile("h100-8b", "NVIDIA-H100-80GB-HBM3", "llama-3.1-8b", measured=[
            {"joulesPerToken": 0.5, "samples": 10, "node": "n0"},
            {"joulesPerToken": 0.9, "samples": 10, "node": "n1"}]),
    ])
    pub = KubeProfilePublisher(api, now=lambda: NOW)
    assert pub.publish(m())
    ((name, body),) = api.patches
    assert name == "h100-8b"
    assert body["metadata"]["resourceVersion"] == "7"  # optimistic concurrency
    measured = body["status"]["measured"]
    assert measured == [
        {"joulesPerToken": 0.5, "samples": 10, "node": "n0"},
        {"joulesPerToken": 0.42, "samples": 1234, "node": "n1",
         "updatedAt": "2025-01-02T03:04:05Z"},
    ]
    GPUProfileStatus.model_validate(body["status"])  # the CRD's own model accepts it


def test_matching_by_tp_degree_and_no_match():
    api = FakeCustomObjects([
        profile("a100-70b-tp4", "A100", "llama-3.1-70b", gpus=4),
        profile("a100-70b-tp2", "A100", "llama-3.1-70b", gpus=2),
    ])
    pub = KubeProfilePublisher(api, now=lambda: NOW)
    assert pub.publish(m(product="A100", model="llama-3.1-70b", gpus=2))
    assert api.patches[-1][0] == "a100-70b-tp2"
    # unknown TP degree and two candidates: ambiguous, not published
    assert not pub.publish(m(product="A100", model="llama-3.1-70b", gpus=None))
    assert not pub.publish(m(product="L4"))
    assert len(api.patches) == 1


def test_rate_limited_per_kind():
    class Inner:
        def __init__(self):
            self.n = 0

        def publish(self, _m):
            self.n += 1
            return True

    t = {"now": 0.0}
    inner = Inner()
    pub = RateLimited(inner, 60.0, monotonic=lambda: t["now"])
    assert pub.publish(m())
    assert not pub.publish(m())  # too soon
    assert pub.publish(m(model="other"))  # a different kind has its own budget
    t["now"] = 59.0
    assert not pub.publish(m())
    t["now"] = 60.0
    assert pub.publish(m())
    assert inner.n == 3


def test_stale_entries_of_other_nodes_are_pruned_and_the_list_is_capped():
    def at(minutes_ago: float) -> str:
        return (NOW - timedelta(minutes=minutes_ago)).isoformat().replace("+00:00", "Z")

    measured = [{"joulesPerToken": 0.5, "samples": 1, "node": "gone", "updatedAt": at(11)},
                {"joulesPerToken": 0.5, "samples": 1, "node": "n0", "updatedAt": at(1)},
                {"joulesPerToken": 0.5, "samples": 1, "node": "legacy"}]  # no timestamp
    measured += [{"joulesPerToken": 0.5, "samples": 1, "node": f"x{i:03d}",
                  "updatedAt": at(i / 100)} for i in range(200)]
    api = FakeCustomObjects([profile("h100-8b", "H100", "llama-3.1-8b", measured=measured)])
    pub = KubeProfilePublisher(api, now=lambda: NOW, max_age_s=600.0, max_entries=10)
    assert pub.publish(m())
    out = api.patches[-1][1]["status"]["measured"]
    nodes = [e["node"] for e in out]
    assert len(out) == 10
    assert "n1" in nodes  # ours, always
    assert "gone" not in nodes  # not updated for 11 min > 10 min
    assert "legacy" not in nodes  # undated entries go first when over the cap
    assert set(nodes) - {"n1"} == {f"x{i:03d}" for i in range(9)}  # the freshest
    assert nodes == sorted(nodes)
    GPUProfileStatus.model_validate(api.patches[-1][1]["status"])
    # growth is bounded over many nodes publishing
    for i in range(50):
        pub.publish(m(node=f"n{i + 100}"))
    assert len(api.items[0]["status"]["measured"]) == 10


def test_default_bound_keeps_recent_untimestamped_entries_under_the_cap():
    api = FakeCustomObjects([profile("h100-8b", "H100", "llama-3.1-8b", measured=[
        {"joulesPerToken": 0.5, "samples": 10, "node": "n0"}])])
    assert KubeProfilePublisher(api, now=lambda: NOW).publish(m())
    assert [e["node"] for e in api.patches[-1][1]["status"]["measured"]] == ["n0", "n1"]


def test_the_matching_profile_is_listed_once_then_read_by_name():
    items = [profile("a100-8b", "A100", "llama-3.1-8b"),
             profile("h100-8b", "H100", "llama-3.1-8b")]
    api = FakeCustomObjects(items)
    pub = KubeProfilePublisher(api, now=lambda: NOW)
    for _ in range(5):
        assert pub.publish(m())
    assert api.lists == 1
    assert api.gets == ["h100-8b"] * 4
    assert [n for n, _ in api.patches] == ["h100-8b"] * 5
    # deleted and recreated under another name: found again by LIST
    items[1] = profile("h100-8b-v2", "H100", "llama-3.1-8b")
    assert pub.publish(m())
    assert api.lists == 2 and api.patches[-1][0] == "h100-8b-v2"
    # its spec changed to another model: not written to, LIST again, nothing matches
    items[1]["spec"]["model"] = "other"
    assert not pub.publish(m())
    assert api.lists == 3 and len(api.patches) == 6


def test_no_matching_profile_is_said_once_at_info_with_how_to_create_one(caplog):
    caplog.set_level(logging.DEBUG, logger="joulepool.nodeagent.publisher")
    api = FakeCustomObjects([profile("a100-8b", "A100", "llama-3.1-8b")])
    pub = KubeProfilePublisher(api, now=lambda: NOW)
    for _ in range(3):
        assert not pub.publish(m())
    said = [r for r in caplog.records if "no GPUProfile" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO
    text = said[0].getMessage()
    assert "will not be published" in text and "create a GPUProfile" in text
    assert "spec.product: H100" in text and "spec.model: llama-3.1-8b" in text
    # once one exists it is published, and a later loss is said again
    api.items.append(profile("h100-8b", "H100", "llama-3.1-8b"))
    assert pub.publish(m())
    api.items.pop()
    assert not pub.publish(m())
    assert len([r for r in caplog.records if "no GPUProfile" in r.getMessage()]) == 2
