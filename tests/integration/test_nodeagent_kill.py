"""The node-agent kill harness, a small seeded set (the large one: ``joulepool bench
nodeagent_kill``): SIGTERM / SIGINT / SIGKILL and restart under hung and failing NVML
calls leave no GPU locked."""

from __future__ import annotations

from joulepool.fakes.killharness import KillSettings, run_kill_harness


def test_kill_harness_leaves_no_gpu_locked(tmp_path):
    report = run_kill_harness(tmp_path, KillSettings(trials=6, seed=7))
    summary = report.as_dict()
    assert report.trials == 6 and set(report.signals) == {"SIGTERM", "SIGINT", "SIGKILL"}
    assert sum(report.faults.values()) >= 6  # at least one injected fault per trial
    assert report.health_probes == 6
    assert report.ok(), summary


def test_kill_harness_in_power_limit_mode_leaves_no_limit_set(tmp_path):
    report = run_kill_harness(tmp_path, KillSettings(trials=3, seed=11, control="power"))
    assert report.trials == 3 and sum(report.faults.values()) >= 3
    assert report.ok(), report.as_dict()


def test_kill_harness_sees_locked_gpus_when_resets_are_not_retried(tmp_path):
    """The harness can fail: with no reset grace, faults outlast the single try."""
    report = run_kill_harness(tmp_path, KillSettings(trials=3, seed=2, reset_grace_s=0.0,
                                                     max_faults_per_trial=3))
    assert report.left_locked > 0, report.as_dict()
