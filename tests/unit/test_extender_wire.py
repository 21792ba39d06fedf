"""Extender wire types (Go field names) and the Kubernetes objects in them (kube.objects:
quantities, pod GPU requests)."""

from __future__ import annotations

import json

import pytest

from joulepool.api.contract import EXTENDER_PORT as DEFAULT_PORT
from joulepool.api.contract import EXTENDER_PREFIX as DEFAULT_PREFIX
from joulepool.api.contract import MODE_LABEL
from joulepool.extender.wire import (
    VERBS,
    ExtenderArgs,
    ExtenderFilterResult,
    HostPriority,
    Node,
    Pod,
)
from joulepool.kube import testing as T


def test_constants_the_chart_renders() -> None:
    assert (DEFAULT_PORT, DEFAULT_PREFIX, VERBS) == (8888, "/scheduler", ("filter", "prioritize"))


def test_mode_label_is_the_operators() -> None:
    from joulepool.operator import resources

    assert MODE_LABEL == resources.MODE_LABEL == "joulepool.dev/mode"
    pod = Pod.model_validate(T.pod("p", mode="4xH100"))
    assert pod.mode == "4xH100"
    assert Pod.model_validate(T.pod("p")).mode is None


def test_pod_gpu_request_follows_scheduler_rules() -> None:
    assert Pod.model_validate(T.pod("a", gpus=2)).gpu_request() == 2
    # init containers: max(sum of app containers, largest init container)
    assert Pod.model_validate(T.pod("b", gpus=1, init_gpus=4)).gpu_request() == 4
    # a limit alone implies the request for extended resources
    limits_only = T.pod("c", gpus=0)
    limits_only["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": "3"}}
    assert Pod.model_validate(limits_only).gpu_request() == 3
    overhead = T.pod("d", gpus=1)
    overhead["spec"]["overhead"] = {"nvidia.com/gpu": "1"}
    assert Pod.model_validate(overhead).gpu_request() == 2


def test_pod_pool_ready_and_port() -> None:
    p = Pod.model_validate(T.pod("x", pool="ns.p", node_name="n", ready=True, ip="10.1.2.3",
                                 port=9000))
    assert p.pool == "ns.p" and p.ready and p.serving_port(8000) == 9000
    assert Pod.model_validate(T.pod("y", pool=None)).pool is None
    pending = Pod.model_validate(T.pod("z"))
    assert not pending.ready
    ann = T.pod("w", ready=True, node_name="n", ip="10.0.0.1")
    ann["metadata"]["annotations"]["joulepool.dev/port"] = "7000"
    assert Pod.model_validate(ann).serving_port(8000) == 7000
    deleting = T.pod("v", ready=True, node_name="n", ip="10.0.0.1")
    deleting["metadata"]["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    assert not Pod.model_validate(deleting).ready


def test_node_allocatable_and_labels() -> None:
    n = Node.model_validate(T.node("n1", "A100", gpus=4, region="us-east"))
    assert n.allocatable_gpus() == 4
    assert n.label("topology.kubernetes.io/region") == "us-east"
    bare = T.node("n2")
    del bare["status"]["allocatable"]["nvidia.com/gpu"]
    bare["status"]["capacity"]["nvidia.com/gpu"] = "2"
    assert Node.model_validate(bare).allocatable_gpus() == 2


def test_extender_args_use_go_field_names() -> None:
    raw = T.extender_args(T.pod("p"), names=["a", "b"])
    args = ExtenderArgs.model_validate(json.loads(json.dumps(raw)))
    assert args.pod is not None and args.node_names == ["a", "b"] and args.nodes is None
    # lowercase keys are not the wire format
    assert ExtenderArgs.model_validate({"pod": {}, "nodenames": ["a"]}).node_names is None
    full = ExtenderArgs.model_validate(T.extender_args(T.pod("p"), nodes=[T.node("n")]))
    assert full.nodes is not None and full.nodes.items is not None
    assert full.nodes.items[0].allocatable_gpus() == 8


def test_filter_result_and_priority_serialise_exactly() -> None:
    out = ExtenderFilterResult(NodeNames=["a"], FailedNodes={"b": "why"}).to_wire()
    assert out == {"Nodes": None, "NodeNames": ["a"], "FailedNodes": {"b": "why"},
                   "FailedAndUnresolvableNodes": {}, "Error": ""}
    hp = HostPriority(Host="a", Score=10)
    assert hp.model_dump(by_alias=True) == {"Host": "a", "Score": 10}
    with pytest.raises(ValueError):
        HostPriority(Host="a", Score=11)
