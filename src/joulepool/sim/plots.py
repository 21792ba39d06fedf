"""PNG plots of a run (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from joulepool.core.energy import megajoules_per_hour
from joulepool.sim.report import BASELINE, Summary
from joulepool.sim.runner import ExperimentResult

MAX_CDF_POINTS = 4000


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def energy_plot(res: ExperimentResult, summary: Summary, path: Path) -> None:
    plt = _plt()
    names = list(summary.stats)
    means = [summary.stats[p]["energy_mj_per_h"].mean for p in names]
    errs = [summary.stats[p]["energy_mj_per_h"].half_width for p in names]
    errs = [0.0 if math.isnan(e) else e for e in errs]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names) + 2), 4.2))
    colors = ["#999999" if p == BASELINE else "#2a7ab0" for p in names]
    bars = ax.bar(names, means, yerr=errs, capsize=4, color=colors)
    floors = [r.floor for r in res.repeats if r.floor.feasible]
    if floors:
        floor = float(np.mean([megajoules_per_hour(f.energy_j, f.horizon_s) for f in floors]))
        ax.axhline(floor, color="#c0392b", linestyle="--", linewidth=1.2)
        ax.text(len(names) - 0.5, floor, f" energy floor {floor:.0f}", va="bottom", ha="right",
                color="#c0392b", fontsize=8)
    for bar, p in zip(bars, names, strict=True):
        d = summary.stats[p]["energy_vs_rr"].mean
        if not math.isnan(d) and p != BASELINE:
            ax.annotate(f"{d:+.0%}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("energy, MJ per hour")
    ax.set_title(f"{res.experiment.cluster.name}: energy per policy (all GPUs, idle included)")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cdf(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    v = np.sort(values[np.isfinite(values)])
    n_all = values.size
    if v.size > MAX_CDF_POINTS:
        idx = np.linspace(0, v.size - 1, MAX_CDF_POINTS).astype(int)
        return v[idx], (idx + 1) / n_all
    return v, np.arange(1, v.size + 1) / max(n_all, 1)


def latency_plot(res: ExperimentResult, path: Path) -> None:
    plt = _plt()
    wl = res.repeats[0].workload
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for policy, runs in res.runs.items():
        run = runs[0]
        e2e = np.where(np.isnan(run.t_done), np.inf, run.t_done - wl.arrival_s)
        ttft = np.where(np.isnan(run.t_first), np.inf, run.t_first - wl.arrival_s)
        style = "--" if policy == BASELINE else "-"
        for ax, vals in zip(axes, (e2e, ttft), strict=True):
            x, y = _cdf(vals)
            ax.plot(np.maximum(x, 1e-3), y, style, label=policy, linewidth=1.2)
    for ax, title in zip(axes, ("end-to-end latency", "time to first token"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("seconds (log)")
        ax.set_ylabel("share of requests")
        ax.set_title(f"{title} (seed {res.repeats[0].seed})\n{scenario_title(res)}",
                     fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].axvline(0.3, color="grey", linewidth=0.8, linestyle=":")
    axes[1].axvline(0.6, color="grey", linewidth=0.8, linestyle=":")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def clock_power_plot(res: ExperimentResult, path: Path) -> None:
    plt = _plt()
    policies = list(res.runs)
    fig, axes = plt.subplots(len(policies), 2, figsize=(12, 1.9 * len(policies) + 0.8),
                             sharex=True, squeeze=False)
    for row, policy in enumerate(policies):
        run = res.runs[policy][0]
        for name in run.samples_clock:
            axes[row][0].plot(run.samples_t, run.samples_clock[name], linewidth=0.9, label=name)
            axes[row][1].plot(run.samples_t, run.samples_power[name], linewidth=0.7, label=name)
        axes[row][0].set_ylabel(f"{policy}\nMHz", fontsize=8)
        axes[row][1].set_ylabel("W", fontsize=8)
        for ax in axes[row]:
            ax.tick_params(labelsize=7)
            ax.grid(True, alpha=0.3)
    axes[0][0].set_title("SM clock of sample GPUs (NaN = GPU holds no instance)", fontsize=9)
    axes[0][1].set_title("power of sample GPUs (1 s means)", fontsize=9)
    axes[0][1].legend(fontsize=7, loc="upper right")
    axes[-1][0].set_xlabel("simulated seconds")
    axes[-1][1].set_xlabel("simulated seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def scenario_title(res: ExperimentResult) -> str:
    """Cluster, trace and load of the run, for plot titles."""
    exp = res.experiment
    return (f"{exp.cluster.name} | trace {exp.trace.name} | "
            f"{exp.arrival_mode} {exp.arrival_value:g}")


def tradeoff_plot(res: ExperimentResult, summary: Summary, path: Path) -> None:
    """Energy and carbon against P99 latency per policy (log latency axis), each point
    labelled with its deadline attainment: the trade-off in one picture."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for policy, st in summary.stats.items():
        p99_s = st["p99_ms"].mean / 1e3
        ok = 1.0 - st["deadline_miss_rate"].mean
        marker = "s" if policy == BASELINE else "o"
        for ax, key in zip(axes, ("energy_mj_per_h", "gco2_per_h"), strict=True):
            ax.scatter([p99_s], [st[key].mean], marker=marker, s=50)
            ax.annotate(f"{policy}\n{ok:.1%} on time", (p99_s, st[key].mean), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
    for ax, label in zip(axes, ("energy, MJ/h", "carbon, gCO2/h"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("P99 end-to-end latency, s (log)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"energy and carbon vs tail latency and SLO attainment\n{scenario_title(res)}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(res: ExperimentResult, summary: Summary, out_dir: Path, prefix: str) -> list[Path]:
    paths = [
        out_dir / f"{prefix}-energy.png",
        out_dir / f"{prefix}-latency-cdf.png",
        out_dir / f"{prefix}-clock-power.png",
        out_dir / f"{prefix}-tradeoff.png",
    ]
    energy_plot(res, summary, paths[0])
    latency_plot(res, paths[1])
    clock_power_plot(res, paths[2])
    tradeoff_plot(res, summary, paths[3])
    return paths
