"""The uninstall reset hooks (post-delete): agents gone, every GPU node reset, awaited."""

from __future__ import annotations

from typing import Any

import pytest
from chartlib import Rendered, name, render_raw, rendered

from joulepool.cli import build_parser
from joulepool.nodeagent.settings import NodeAgentSettings
from joulepool.settings import load

HOOK = "helm.sh/hook"
WEIGHT = "helm.sh/hook-weight"


def hooks(r: Rendered) -> list[dict[str, Any]]:
    return [o for o in r.objects() if HOOK in (o["metadata"].get("annotations") or {})]


def component(o: dict[str, Any]) -> str:
    return str(o["metadata"]["labels"]["app.kubernetes.io/component"])


def agent_args(c: dict[str, Any]) -> list[str]:
    args = list(c["args"])
    return args[args.index("node-agent"):]


def settings(args: list[str]) -> NodeAgentSettings:
    """The node agent's settings from these arguments, as the command loads them."""
    return load(NodeAgentSettings, build_parser().parse_args(args))


@pytest.mark.parametrize("key", ["default", "simulated", "kind", "monitor-only"])
def test_post_delete_hooks_in_order(key: str) -> None:
    r = rendered(key)
    hs = hooks(r)
    assert {o["metadata"]["annotations"][HOOK] for o in hs} == {"post-delete"}
    for o in hs:
        policy = o["metadata"]["annotations"]["helm.sh/hook-delete-policy"]
        assert set(policy.split(",")) == {"before-hook-creation", "hook-succeeded"}
    order = sorted(hs, key=lambda o: int(o["metadata"]["annotations"][WEIGHT]))
    kinds = [o["kind"] for o in order]
    # RBAC first, then: wait for the agents, reset DaemonSet(s), wait for them
    assert kinds[:3] == ["ServiceAccount", "Role", "RoleBinding"]
    assert kinds[3] == "Job" and kinds[-1] == "Job"
    assert set(kinds[4:-1]) == {"DaemonSet"}
    gone, done = order[3], order[-1]
    gone_args = agent_args(gone["spec"]["template"]["spec"]["containers"][0])
    done_args = agent_args(done["spec"]["template"]["spec"]["containers"][0])
    # the first Job waits for exactly the agents' pods (not the reset pods)
    selector = dict(kv.split("=") for kv in gone_args[gone_args.index("--await-pods-gone") + 1]
                    .split(","))
    agent_pods = [w["spec"]["template"]["metadata"]["labels"] for w in r.all("DaemonSet")
                  if component(w) == "node-agent"]
    reset_sets = [w for w in r.all("DaemonSet") if component(w) == "node-agent-reset"]
    assert agent_pods and all(selector.items() <= p.items() for p in agent_pods)
    assert not any(selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
                   for w in reset_sets)
    # the last Job waits for every reset DaemonSet, and may read just those
    names = done_args[done_args.index("--await-daemonset") + 1].split(",")
    assert sorted(names) == sorted(w["metadata"]["name"] for w in reset_sets)
    role = r.get("Role", name("node-agent-reset"))
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
        {"apiGroups": ["apps"], "resources": ["daemonsets/status"], "resourceNames": names,
         "verbs": ["get"]}]
    for job in (gone, done):
        spec = job["spec"]["template"]["spec"]
        assert spec["serviceAccountName"] == name("node-agent-reset")
        assert spec["restartPolicy"] == "Never"
        assert job["spec"]["activeDeadlineSeconds"] > 300  # outlives its own wait
    for args in (gone_args, done_args):
        assert settings(args).await_timeout == 300


@pytest.mark.parametrize("key", ["default", "simulated", "kind", "monitor-only"])
def test_reset_daemonsets_cover_the_agents_nodes_with_the_agents_backend(key: str) -> None:
    r = rendered(key)
    agents = {w["metadata"]["name"]: w for w in r.all("DaemonSet") if component(w) == "node-agent"}
    resets = [w for w in r.all("DaemonSet") if component(w) == "node-agent-reset"]
    assert len(resets) == len(agents)
    for reset in resets:
        agent = agents[reset["metadata"]["name"].replace("-node-agent-reset", "-node-agent")]
        a, b = agent["spec"]["template"]["spec"], reset["spec"]["template"]["spec"]
        for field in ("nodeSelector", "tolerations", "affinity", "priorityClassName",
                      "runtimeClassName"):
            assert a.get(field) == b.get(field), field
        assert b["automountServiceAccountToken"] is False
        (init,) = b["initContainers"]
        (hold,) = b["containers"]
        reset_args = settings(agent_args(init))
        run_args = settings(agent_args(next(c for c in a["containers"] if c["name"] == "agent")))
        assert reset_args.reset_and_exit is True and not reset_args.hold
        for flag in ("backend", "control", "gpu_state", "product", "count",
                     "sim_unprivileged", "reset_grace"):
            assert getattr(reset_args, flag) == getattr(run_args, flag), flag
        # the holding container touches no GPU and has no privilege
        assert agent_args(hold) == ["node-agent", "--hold"]
        assert "add" not in hold["securityContext"]["capabilities"]
        # same privilege as the agent for the reset itself
        assert (init["securityContext"].get("capabilities", {}).get("add")
                == next(c for c in a["containers"] if c["name"] == "agent")
                ["securityContext"].get("capabilities", {}).get("add"))


def test_reset_grace_fits_the_termination_grace_period() -> None:
    for grace in (30, 12, 6):
        r = Rendered(render_raw({"nodeAgent": {"terminationGracePeriodSeconds": grace}}))
        ds = r.get("DaemonSet", name("node-agent"))
        spec = ds["spec"]["template"]["spec"]
        assert spec["terminationGracePeriodSeconds"] == grace
        args = agent_args(spec["containers"][0])
        reset_grace = float(args[args.index("--reset-grace") + 1])
        assert 0 < reset_grace <= grace - 5


def test_power_limit_mode_reaches_the_agent_and_the_uninstall_reset() -> None:
    r = Rendered(render_raw({"nodeAgent": {"control": "power"}}))
    for ds in r.all("DaemonSet"):
        spec = ds["spec"]["template"]["spec"]
        c = (spec.get("initContainers") or spec["containers"])[0] \
            if component(ds) == "node-agent-reset" else spec["containers"][0]
        assert settings(agent_args(c)).control == "power", ds["metadata"]["name"]


def test_uninstall_reset_can_be_turned_off() -> None:
    r = Rendered(render_raw({"nodeAgent": {"uninstallReset": {"enabled": False}}}))
    assert hooks(r) == []
    r = Rendered(render_raw({"nodeAgent": {"enabled": False}}))
    assert hooks(r) == []
