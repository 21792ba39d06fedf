"""Publishing J/token to GPUProfile status: matching, merging, rate limit."""

from __future__ import annotations

from datetime import UTC, datetime

from joulepool.api.models import GPUProfileStatus
from joulepool.sidecar.publisher import KubeProfilePublisher, Measurement, RateLimited


class FakeCustomObjects:
    def __init__(self, items) -> None:
        self.items = items
        self.patches: list[tuple] = []

    def list_cluster_custom_object(self, group, version, plural):
        assert (group, version, plural) == ("joulepool.dev", "v1alpha1", "gpuprofiles")
        return {"items": self.items}

    def patch_cluster_custom_object_status(self, group, version, plural, name, body):
        self.patches.append((name, body))
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
