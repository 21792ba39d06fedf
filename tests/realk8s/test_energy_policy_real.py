"""The generated EnergyPolicy CRD on a REAL kube-apiserver v1.30 (``../shared/k8s``):
``shareInstances`` (api/models.py, docs/planner.md "Shared instances") is defaulted to
true by the API server when absent, kept when false, and a value that is not a boolean
is refused with the field named. The operator's planning with it is tested over kmock
(tests/integration/test_operator_reconcile.py::
test_energy_policy_share_instances_false_gives_every_pool_its_own)."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from k8slib import ControlPlane

from joulepool.api.contract import ENERGYPOLICIES
from joulepool.api.models import GROUP, VERSION, EnergyPolicy


def _policy(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "EnergyPolicy",
            "metadata": {"name": name}, "spec": spec}


def test_share_instances_is_defaulted_kept_and_validated(cluster: ControlPlane) -> None:
    from kubernetes.client.exceptions import ApiException

    custom = cluster.custom
    names = ("share-default", "share-off", "share-bad")
    try:
        custom.create_cluster_custom_object(GROUP, VERSION, ENERGYPOLICIES,
                                            _policy(names[0], {}))
        custom.create_cluster_custom_object(GROUP, VERSION, ENERGYPOLICIES,
                                            _policy(names[1], {"shareInstances": False}))
        stored = [custom.get_cluster_custom_object(GROUP, VERSION, ENERGYPOLICIES, n)
                  for n in names[:2]]
        assert [p["spec"]["shareInstances"] for p in stored] == [True, False]
        # what the API server stores is what the operator reads
        assert [EnergyPolicy.model_validate(p).spec.share_instances for p in stored] == [
            True, False]
        with pytest.raises(ApiException) as refused:
            custom.create_cluster_custom_object(
                GROUP, VERSION, ENERGYPOLICIES, _policy(names[2], {"shareInstances": "no"}))
        assert refused.value.status == 422 and "shareInstances" in str(refused.value.body)
    finally:
        for n in names:
            with contextlib.suppress(ApiException):
                custom.delete_cluster_custom_object(GROUP, VERSION, ENERGYPOLICIES, n)
