"""`joulepool plan` and the pooling bridge it shares with the operator."""

import json
import math
from pathlib import Path

import pytest
import yaml

from joulepool.api.load import load_manifests
from joulepool.api.models import EnergyPolicySpec, InferencePool
from joulepool.cli import main
from joulepool.core.planner import PlanNode
from joulepool.core.problem import node_from_label
from joulepool.pooling import plan_pools

ROOT = Path(__file__).resolve().parents[2]
POOLS = str(ROOT / "examples" / "pools.yaml")


def _pool(name, rps, model="llama-3.1-8b", **spec):
    return InferencePool.model_validate({
        "kind": "InferencePool", "metadata": {"name": name, "namespace": "ns"},
        "spec": {"model": model, "slo": {"ttftSeconds": 0.6, "tpotSeconds": 0.1},
                 "demand": {"requestsPerSecond": rps, "meanInputTokens": 500,
                            "meanOutputTokens": 200}, **spec},
    })


def test_plan_table(capsys):
    assert main(["plan", "-f", POOLS]) == 0
    out = capsys.readouterr().out
    assert "default.chat" in out and "capacity used" in out and "optimal" in out


def test_plan_json_is_a_plan_document(capsys):
    assert main(["plan", "-f", POOLS, "-o", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["feasible"] is True
    pools = data["plan"]["pools"]
    assert set(pools) == {"default.chat", "default.rag", "default.batch-summaries"}
    assert all(p["replicas"] >= 1 for p in pools.values())


def test_bad_yaml_exits_2_naming_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: InferencePool\n  metadata: [\n")
    assert main(["plan", "-f", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "invalid YAML" in err


def test_schema_violation_exits_2_naming_the_field(tmp_path, capsys):
    docs = list(yaml.safe_load_all(Path(POOLS).read_text()))
    docs[1]["spec"]["demand"]["meanOutputTokens"] = "lots"
    f = tmp_path / "pools.yaml"
    f.write_text(yaml.safe_dump_all(docs))
    assert main(["plan", "-f", str(f)]) == 2
    err = capsys.readouterr().err
    assert "spec.demand.meanOutputTokens" in err and "pools.yaml (document 2)" in err


def test_missing_file_exits_2(capsys):
    assert main(["plan", "-f", "/nonexistent/pools.yaml"]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_infeasible_plan_says_what_cannot_be_met(tmp_path, capsys):
    docs = list(yaml.safe_load_all(Path(POOLS).read_text()))
    docs[2]["spec"]["demand"]["requestsPerSecond"] = 5000  # far beyond the cluster
    f = tmp_path / "pools.yaml"
    f.write_text(yaml.safe_dump_all(docs))
    assert main(["plan", "-f", str(f)]) == 1
    out = capsys.readouterr().out
    assert "cannot be met" in out and "default.rag" in out and "unmet demand" in out


def test_joint_plan_never_double_books_gpus():
    nodes = [PlanNode("h1", "east", "H100", 8), PlanNode("a1", "east", "A100", 8)]
    pools = [_pool(f"p{i}", 20) for i in range(4)]
    plan = plan_pools(pools, nodes, EnergyPolicySpec())
    used: dict[str, int] = {}
    for out in plan.outcomes.values():
        for a in out.assignments:
            used[a.node] = used.get(a.node, 0) + a.gpus
    assert all(used[n.name] <= n.gpus for n in nodes if n.name in used)
    assert sum(plan.document.nodes["h1"].pools.values()) == used.get("h1", 0)


def test_allowed_products_and_missing_profiles_are_respected():
    nodes = [PlanNode("h1", "east", "H100", 8), node_from_label("l1", "west", "NVIDIA-L4", 4)]
    plan = plan_pools([_pool("only-l4", 1, gpuProducts=["L4"])], nodes, EnergyPolicySpec())
    assert {a.gpu_product for a in plan.outcomes["ns.only-l4"].assignments} == {"L4"}
    plan = plan_pools([_pool("big", 1, model="llama-3.1-70b", gpuProducts=["L4"])], nodes,
                      EnergyPolicySpec())
    assert not plan.result.feasible and not plan.outcomes["ns.big"].planned


def test_example_policy_is_carbon():
    pols = [r for r in load_manifests(POOLS) if type(r).__name__ == "EnergyPolicy"]
    assert pols[0].spec.objective == "carbon"


def test_pools_are_sized_with_cores_queueing_headroom():
    """L[r, m] is core's operating point with the default headroom: the same call the
    simulator's planner makes, not the instance's saturation throughput."""
    from joulepool.core.profiles import DEFAULT_HEADROOM, H100_8B
    from joulepool.pooling import build_problem

    nodes = [PlanNode("h1", "east", "H100", 8)]
    problem = build_problem([_pool("chat", 10)], nodes, EnergyPolicySpec())
    power, rps = H100_8B.operating_point(500, 200, 0.6, 0.1, headroom=DEFAULT_HEADROOM)
    assert problem.capacity_rps[0, 0] == rps and problem.power_w[0, 0] == power
    assert rps < H100_8B.throughput_rps(500, 200, 0.1)
    plan = plan_pools([_pool("chat", 10)], nodes, EnergyPolicySpec())
    assert plan.result.feasible and plan.headroom_note == ""
    assert plan.outcomes["ns.chat"].replicas == math.ceil(10 * 1.1 / rps)


def test_a_cluster_short_of_headroom_plans_with_less_and_says_so(tmp_path, capsys):
    """2000-token prompts, TTFT 0.6 s: 7.7 req/s per H100 in a pool of 8 with the full
    headroom (8.1 with none), so 8 H100s fall short of 57 * 1.1 req/s; with less headroom
    they carry it, and the plan says so."""
    body = {
        "apiVersion": "joulepool.dev/v1alpha1", "kind": "InferencePool",
        "metadata": {"name": "rag", "namespace": "ns"},
        "spec": {"model": "llama-3.1-8b", "slo": {"ttftSeconds": 0.6, "tpotSeconds": 0.15},
                 "demand": {"requestsPerSecond": 57, "meanInputTokens": 2000,
                            "meanOutputTokens": 200}},
    }
    nodes = [PlanNode("h1", "east", "H100", 8)]
    plan = plan_pools([InferencePool.model_validate(body)], nodes, EnergyPolicySpec())
    assert plan.result.feasible and "queueing headroom" in plan.headroom_note
    assert plan.headroom_note in plan.document.message
    assert plan.headroom_note in plan.outcomes["ns.rag"].message
    f = tmp_path / "rag.yaml"
    f.write_text(yaml.safe_dump(body))
    cl = tmp_path / "cluster.yaml"
    cl.write_text(yaml.safe_dump({"name": "one", "nodes": [
        {"name": "h1", "site": "east", "product": "H100", "gpus": 8}]}))
    assert main(["plan", "-f", str(f), "--cluster", str(cl), "-o", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert "queueing headroom" in data["headroom"]
    assert main(["plan", "-f", str(f), "--cluster", str(cl)]) == 0
    assert "note: the cluster cannot carry" in capsys.readouterr().out


def test_an_oversized_pool_does_not_take_the_gpus_of_a_pool_that_fits_alone():
    """Example cluster: chat (40 req/s) fits on its own; greedy (5000 req/s) never can.

    The partial plan must still serve chat in full instead of giving greedy every GPU.
    """
    from joulepool.api.cluster import load_cluster
    from joulepool.pooling import nodes_from_cluster

    cluster = load_cluster(ROOT / "src" / "joulepool" / "examples" / "cluster.yaml")
    nodes = nodes_from_cluster(cluster.expanded())

    def pool(ns, name, rps):
        return InferencePool.model_validate({
            "kind": "InferencePool", "metadata": {"name": name, "namespace": ns},
            "spec": {"model": "llama-3.1-8b", "tier": "interactive",
                     "slo": {"ttftSeconds": 0.3, "tpotSeconds": 0.05},
                     "demand": {"requestsPerSecond": rps, "meanInputTokens": 1020,
                                "meanOutputTokens": 130}},
        })

    chat, greedy = pool("default", "chat", 40), pool("team-b", "greedy", 5000)
    assert plan_pools([chat], nodes, EnergyPolicySpec()).result.feasible  # fits alone
    plan = plan_pools([chat, greedy], nodes, EnergyPolicySpec(), partial=True)
    assert not plan.result.feasible
    assert plan.outcomes["default.chat"].planned and plan.outcomes["default.chat"].replicas > 0
    assert plan.result.served_rps("default.chat") >= 44.0 - 1e-6  # alpha * 40
    assert not plan.outcomes["team-b.greedy"].planned
    assert plan.outcomes["team-b.greedy"].replicas > 0  # the rest serves greedy
    assert [s.cls for s in plan.result.shortfalls] == ["team-b.greedy"]


def test_energy_policy_gap_and_negative_carbon_reach_the_planner():
    """mipRelGap is the planner's gap; a negative marginal intensity is accepted."""
    from joulepool.core.planner import DEFAULT_MIP_REL_GAP
    from joulepool.pooling import build_problem

    nodes = [PlanNode("h1", "east", "H100", 8)]
    assert build_problem([_pool("chat", 10)], nodes, EnergyPolicySpec()).mip_rel_gap == (
        DEFAULT_MIP_REL_GAP)
    policy = EnergyPolicySpec.model_validate(
        {"mipRelGap": 0, "objective": "carbon",
         "carbon": [{"site": "east", "series": [-40.0, 10.0, 5.0, 5.0, 5.0, 5.0]}]})
    problem = build_problem([_pool("chat", 10)], nodes, policy)
    assert problem.mip_rel_gap == 0.0 and problem.objective == "carbon"
    plan = plan_pools([_pool("chat", 10)], nodes, policy)
    assert plan.result.feasible and plan.result.status == "optimal"
    with pytest.raises(ValueError, match=r"mipRelGap|mip_rel_gap"):
        EnergyPolicySpec.model_validate({"mipRelGap": 1.0})
    with pytest.raises(ValueError, match="finite"):
        EnergyPolicySpec.model_validate({"carbon": [{"site": "a", "series": [float("nan")]}]})


def test_live_carbon_sources_plan_with_their_fallback_and_say_so(tmp_path, capsys):
    docs = [d for d in yaml.safe_load_all(Path(POOLS).read_text())
            if d["kind"] != "EnergyPolicy"]
    docs.append({"apiVersion": "joulepool.dev/v1alpha1", "kind": "EnergyPolicy",
                 "metadata": {"name": "default"},
                 "spec": {"objective": "carbon", "carbon": [
                     {"site": "us-east", "source": {
                         "provider": "carbonAwareSDK", "url": "http://127.0.0.1:9",
                         "location": "eastus", "fallbackGramsPerKWh": 321}}]}})
    f = tmp_path / "pools.yaml"
    f.write_text(yaml.safe_dump_all(docs))
    assert main(["plan", "-f", str(f)]) == 0
    err = capsys.readouterr().err
    assert "site us-east: live carbon source (carbonAwareSDK) not fetched" in err
    assert "fallback 321 gCO2/kWh" in err


def test_a_cluster_file_rejects_live_carbon_sources(tmp_path, capsys):
    cluster = yaml.safe_load((ROOT / "examples" / "cluster.yaml").read_text())
    cluster["carbon"] = [{"site": "a", "source": {"provider": "configMap",
                                                  "configMap": {"name": "ci"}}}]
    f = tmp_path / "cluster.yaml"
    f.write_text(yaml.safe_dump(cluster))
    assert main(["plan", "-f", POOLS, "--cluster", str(f)]) == 2
    assert "live sources belong in the EnergyPolicy" in capsys.readouterr().err


def _observed_pool_file(tmp_path, age_s):
    """The prompt-tail pool (test_pool_prompt_tail.pool, no declared quantiles) with a
    node agent's entry of long prompts in status.observedInputTokens, ``age_s`` old."""
    from datetime import UTC, datetime, timedelta

    from test_pool_observed_prompts import BOUNDS, LONG, counts
    from test_pool_prompt_tail import pool

    body = pool().model_dump(mode="json", by_alias=True, exclude_none=True)
    body["status"] = {"observedInputTokens": [{
        "node": "a", "bounds": list(BOUNDS), "counts": counts(LONG),
        "updatedAt": (datetime.now(UTC) - timedelta(seconds=age_s)).isoformat()}]}
    f = tmp_path / "chat.yaml"
    f.write_text(yaml.safe_dump(body))
    cl = tmp_path / "cluster.yaml"
    cl.write_text(yaml.safe_dump({"name": "two", "nodes": [
        {"name": "a100", "site": "s1", "product": "A100", "gpus": 8},
        {"name": "h100", "site": "s1", "product": "H100", "gpus": 8}]}))
    return str(f), str(cl)


def _modes_planned(capsys, argv):
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    return {i["mode"] for i in data["plan"]["pools"]["default.chat"]["assignments"]}


def test_plan_uses_the_observed_prompt_tail_in_the_pool_status_as_the_operator(
        tmp_path, capsys):
    """Fresh observed long prompts keep the pool off the A100 (as the operator plans,
    test_pool_observed_prompts); entries older than the operator's age limit are not used
    and the CLI says so."""
    f, cl = _observed_pool_file(tmp_path, age_s=30.0)
    assert _modes_planned(capsys, ["plan", "-f", f, "--cluster", cl, "-o", "json"]) == {
        "1xH100"}
    f, cl = _observed_pool_file(tmp_path, age_s=3600.0)
    assert main(["plan", "-f", f, "--cluster", cl, "-o", "json"]) == 0
    out, err = capsys.readouterr()
    assert "1xA100" in {i["mode"] for i in
                        json.loads(out)["plan"]["pools"]["default.chat"]["assignments"]}
    assert "default.chat: status.observedInputTokens not used" in err


def _two_small_pools_on_one_gpu(tmp_path):
    """Two low-rate pools of one model in one namespace and a cluster of one H100: they
    fit only on one shared instance."""
    docs = [{"apiVersion": "joulepool.dev/v1alpha1", "kind": "InferencePool",
             "metadata": {"name": name, "namespace": "ns"},
             "spec": {"model": "llama-3.1-8b", "slo": {"ttftSeconds": 1.0, "tpotSeconds": 0.1},
                      "demand": {"requestsPerSecond": 0.05, "meanInputTokens": 500,
                                 "meanOutputTokens": 100}}} for name in ("chat", "rag")]
    f = tmp_path / "pools.yaml"
    f.write_text(yaml.safe_dump_all(docs))
    cl = tmp_path / "cluster.yaml"
    cl.write_text(yaml.safe_dump({"name": "one", "nodes": [
        {"name": "h0", "site": "east", "product": "H100", "gpus": 1}]}))
    return str(f), str(cl)


def test_gie_pools_are_planned_unshared_as_the_operator_plans_them(tmp_path, capsys):
    """``--gie-pools``: the operator's rule where it manages GIE InferencePools
    (pooling.sharing_policy): no pool is served on another pool's instances."""
    pools, cluster = _two_small_pools_on_one_gpu(tmp_path)
    assert main(["plan", "-f", pools, "--cluster", cluster, "-o", "json"]) == 0
    shared = json.loads(capsys.readouterr().out)
    assert shared["shareInstances"] is True
    assert [a["sharedWith"] for p in shared["plan"]["pools"].values()
            for a in p["assignments"]] in ([["ns.rag"]], [["ns.chat"]])
    # two pools, one GPU, nothing shared: the plan cannot serve both (exit 1)
    assert main(["plan", "-f", pools, "--cluster", cluster, "-o", "json", "--gie-pools"]) == 1
    unshared = json.loads(capsys.readouterr().out)
    assert unshared["shareInstances"] is False and not unshared["feasible"]
    assert all(not a.get("sharedWith") for p in unshared["plan"]["pools"].values()
               for a in p["assignments"])
    assert main(["plan", "-f", pools, "--cluster", cluster, "--gie-pools"]) == 1
    assert "note: instances are not shared between pools (--gie-pools" in capsys.readouterr().out


def test_the_sharing_rule_is_one_function():
    from joulepool.pooling import sharing_policy

    on, off = EnergyPolicySpec(), EnergyPolicySpec(shareInstances=False)
    assert on.share_instances
    planned, withheld = sharing_policy(on, gie_pools=True)
    assert (planned.share_instances, withheld) == (False, True)
    assert planned.model_copy(update={"share_instances": True}) == on  # nothing else moves
    assert sharing_policy(on, gie_pools=False) == (on, False)
    assert sharing_policy(off, gie_pools=True) == (off, False)  # nothing withheld
