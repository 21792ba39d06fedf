"""Which Deployments the operator writes (drift, restarts, scale-downs), and how objects
deleted during a watch gap are found (listings)."""

from __future__ import annotations

from typing import Any

from joulepool.operator.deployments import DeploymentWriter, Written
from joulepool.operator.kube import KubeClient
from joulepool.operator.listings import GoneObjects, Indexed, Listed, current_values
from joulepool.operator.resources import SCALED_DOWN, DeploymentInfo, foreign_spec_owner

K = ("default", "chat-1xh100-n1")
BODY: dict[str, Any] = {"metadata": {"annotations": {"joulepool.dev/spec-hash": "h1"},
                                     "labels": {"joulepool.dev/pool": "default.chat"}},
                        "spec": {"replicas": 2}}


def seen(replicas: int = 2, spec_hash: str = "h1", foreign: bool = False,
         rv: str = "10") -> DeploymentInfo:
    return DeploymentInfo("default", K[1], "default.chat", "1xH100", replicas, 0, spec_hash,
                          foreign, rv)


def test_apply_only_what_is_missing_changed_or_drifted() -> None:
    w = DeploymentWriter(KubeClient())
    assert w.needs_apply(K, BODY, None)  # missing
    assert not w.needs_apply(K, BODY, seen())  # after a restart: live object matches
    assert w.needs_apply(K, BODY, seen(replicas=5))  # scaled by hand
    assert w.needs_apply(K, BODY, seen(foreign=True))  # edited by hand (managedFields)
    assert w.needs_apply(K, BODY, seen(spec_hash="old"))  # desired changed
    w.written[K] = Written("default.chat", "h1", "10")
    assert not w.needs_apply(K, BODY, None)  # the watch has not caught up yet
    assert not w.needs_apply(K, BODY, seen(replicas=5, rv="10"))  # index still pre-write
    assert not w.needs_apply(K, BODY, seen(rv="11"))  # status update only: no drift
    assert w.needs_apply(K, BODY, seen(replicas=5, rv="12"))  # changed since our write
    # a foreign field the apply cannot remove does not make it apply again and again
    w.written[K] = Written("default.chat", "h1", "13")
    assert not w.needs_apply(K, BODY, seen(foreign=True, rv="13"))
    w.written[K] = Written("default.chat", SCALED_DOWN, "14")
    assert w.needs_apply(K, BODY, seen(rv="10"))  # planned again after a scale to 0


def test_scale_down_once() -> None:
    w = DeploymentWriter(KubeClient())
    assert w.needs_scale_down(K, seen())
    assert not w.needs_scale_down(K, seen(replicas=0, spec_hash=SCALED_DOWN))
    assert w.needs_scale_down(K, seen(replicas=3, spec_hash=SCALED_DOWN))  # scaled up by hand
    w.written[K] = Written("default.chat", SCALED_DOWN, "5")
    assert not w.needs_scale_down(K, None)


def test_foreign_spec_owner_reads_managed_fields() -> None:
    ours = {"manager": "joulepool-operator", "operation": "Apply",
            "fieldsV1": {"f:spec": {"f:replicas": {}}}}
    status = {"manager": "kube-controller-manager", "operation": "Update",
              "subresource": "status", "fieldsV1": {"f:status": {}}}
    scale = {"manager": "kubectl", "operation": "Update", "subresource": "scale",
             "fieldsV1": {"f:spec": {"f:replicas": {}}}}
    annotate = {"manager": "kubectl-annotate", "operation": "Update",
                "fieldsV1": {"f:metadata": {"f:annotations": {}}}}
    assert not foreign_spec_owner({"managedFields": [ours, status, annotate]})
    assert foreign_spec_owner({"managedFields": [ours, scale]})


def test_current_values_serve_the_newest_live_object_per_key() -> None:
    old, new = Indexed("u1", "5", "old"), Indexed("u2", "9", "new")
    index = {"gpu-x": [old, new], "gpu-a": [Indexed("u3", "1", "a")], "n": [None], "p": ["x"]}
    assert sorted(current_values(index)) == ["a", "new", "x"]
    assert sorted(current_values(index, frozenset({"u2"}))) == ["a", "old", "x"]
    assert sorted(current_values(index, frozenset({"u1", "u2"}))) == ["a", "x"]


class ListingAPI(KubeClient):
    def __init__(self, items: list[dict[str, Any]], on_list: Any = None) -> None:
        super().__init__()
        self.items, self.on_list = items, on_list

    async def request(self, method: str, path: str, body: Any = None, params: Any = None,
                      content_type: str = "") -> dict[str, Any] | None:
        if self.on_list is not None:
            self.on_list()
        return {"items": self.items}


async def test_listing_marks_what_vanished_but_not_what_changed_meanwhile() -> None:
    gone = GoneObjects()
    index = {"a": [Indexed("ua", "1", "A")], "b": [Indexed("ub", "2", "B")],
             "c": [Indexed("uc", "3", "C")]}
    # "c" gets an event while the listing is on its way (created meanwhile): not marked
    api = ListingAPI([{"metadata": {"name": "a", "uid": "ua"}}],
                     on_list=lambda: gone.seen("nodes", "c", "uc"))
    newly = await gone.check(api, Listed("nodes", "v1", "nodes"), index)
    assert newly == {"b"} and gone.skip("nodes") == {"ub"} and gone.marked == 1
    assert sorted(current_values(index, gone.skip("nodes"))) == ["A", "C"]
    gone.seen("nodes", "b", "ub")  # an event shows it after all: the mark goes
    assert gone.skip("nodes") == frozenset()
