"""PNG plots of a run (matplotlib, Agg backend: no display needed).

Each plot function draws one figure and returns it after saving (closed, so it
holds no display resources): tests inspect its axes and lines, not pixels.
Titles name the cluster, trace, load and SLO set (:func:`scenario_title`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from joulepool.core.classes import CLASS_NAMES, Tier
from joulepool.core.cost import effective_lambda
from joulepool.core.energy import megajoules_per_hour
from joulepool.sim.engine import RunResult
from joulepool.sim.report import BASELINE, Summary, plan_class_series
from joulepool.sim.runner import ExperimentResult
from joulepool.sim.workload import Workload

MAX_CDF_POINTS = 4000


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def energy_plot(res: ExperimentResult, summary: Summary, path: Path) -> Any:
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
    return fig


def _cdf(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    v = np.sort(values[np.isfinite(values)])
    n_all = values.size
    if v.size > MAX_CDF_POINTS:
        idx = np.linspace(0, v.size - 1, MAX_CDF_POINTS).astype(int)
        return v[idx], (idx + 1) / n_all
    return v, np.arange(1, v.size + 1) / max(n_all, 1)


def _latencies(run: RunResult, workload: Workload) -> tuple[np.ndarray, np.ndarray]:
    """Each request's end-to-end latency and time to first token in ``run`` (s from its
    arrival in ``workload``); inf for a request not served (or never started)."""
    e2e = np.where(np.isnan(run.t_done), np.inf, run.t_done - workload.arrival_s)
    ttft = np.where(np.isnan(run.t_first), np.inf, run.t_first - workload.arrival_s)
    return e2e, ttft


def _plot_latencies(res: ExperimentResult, axes: Any,
                    curve: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]) -> None:
    """Per policy (first repeat; the baseline dashed) ``curve`` of its end-to-end
    latencies on ``axes[0]`` and of its TTFTs on ``axes[1]``, x floored at 1 ms."""
    workload = res.repeats[0].workload
    for policy, runs in res.runs.items():
        style = "--" if policy == BASELINE else "-"
        for ax, vals in zip(axes, _latencies(runs[0], workload), strict=True):
            x, y = curve(vals)
            ax.plot(np.maximum(x, 1e-3), y, style, label=policy, linewidth=1.2)


def latency_plot(res: ExperimentResult, path: Path) -> Any:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    _plot_latencies(res, axes, _cdf)
    for ax, title in zip(axes, ("end-to-end latency", "time to first token"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("seconds (log)")
        ax.set_ylabel("share of requests")
        ax.set_title(f"{title} (seed {res.repeats[0].seed})\n{scenario_title(res)}",
                     fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    for slo_s in _ttft_slos(res):
        axes[1].axvline(slo_s, color="grey", linewidth=0.8, linestyle=":")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def clock_power_plot(res: ExperimentResult, path: Path) -> Any:
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
    return fig


def scenario_title(res: ExperimentResult) -> str:
    """Cluster, trace, load (share of the capacity at SLO and req/s) and SLO set."""
    exp = res.experiment
    rate = res.repeats[0].workload.mean_rate_rps if res.repeats else math.nan
    cap = res.capacity.slo_rps
    load = f"load {rate / cap:.0%} of capacity at SLO" if cap > 0 else \
        f"{exp.arrival_mode} {exp.arrival_value:g}"
    return (f"{exp.cluster.name} | trace {exp.trace.name} | {load} ({rate:.3g} req/s) | "
            f"SLOs {exp.slos.name}")


def tradeoff_plot(res: ExperimentResult, summary: Summary, path: Path) -> Any:
    """Energy and carbon against P99 latency per policy (log latency axis), each point
    labelled with its SLO attainment (deadlines met, TTFT and TPOT within SLO): the
    trade-off in one picture."""
    from matplotlib.ticker import LogFormatter

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for policy, st in summary.stats.items():
        p99_s = st["p99_ms"].mean / 1e3
        ok = 1.0 - st["deadline_miss_rate"].mean
        slo = (f"on time {ok:.1%}\nTTFT {st['ttft_attainment'].mean:.1%} "
               f"TPOT {st['tpot_attainment'].mean:.1%}")
        marker = "s" if policy == BASELINE else "o"
        for ax, key in zip(axes, ("energy_mj_per_h", "gco2_per_h"), strict=True):
            ax.scatter([p99_s], [st[key].mean], marker=marker, s=50, label=policy)
            ax.annotate(f"{policy}\n{slo}", (p99_s, st[key].mean), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
    for ax, label in zip(axes, ("energy, MJ/h", "carbon, gCO2/h"), strict=True):
        ax.set_xscale("log")
        # plain numbers (13, 20), not 1.3x10^1: labels of a narrow range do not overlap
        ax.xaxis.set_major_formatter(LogFormatter())
        ax.xaxis.set_minor_formatter(LogFormatter(minor_thresholds=(2, 0.5)))
        ax.set_xlabel("P99 end-to-end latency, s (log)")
        ax.margins(x=0.3, y=0.15)  # room for the labels right of and above the points
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"energy and carbon vs tail latency and SLO attainment\n{scenario_title(res)}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def _ttft_slos(res: ExperimentResult) -> tuple[float, ...]:
    slos = res.experiment.slos
    return tuple(sorted({slos.ttft_short_prompt_s, slos.ttft_long_prompt_s}))


def tail_share(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x, share of all requests above x) at each finite value, for a log-log tail plot;
    infinite values (never served) stay in every share. Shares of 0 are left out."""
    v = np.sort(values[np.isfinite(values)])
    n_all = max(values.size, 1)
    above = (n_all - np.arange(1, v.size + 1)) / n_all
    keep = above > 0
    v, above = v[keep], above[keep]
    if v.size > MAX_CDF_POINTS:
        idx = np.unique(np.geomspace(1, v.size, MAX_CDF_POINTS).astype(int) - 1)
        return v[idx], above[idx]
    return v, above


def tail_latency_plot(res: ExperimentResult, path: Path) -> Any:
    """Share of requests slower than x against x, both log scales: the tail of end-to-end
    latency and of TTFT per policy (unserved requests count as slower than any x)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    _plot_latencies(res, axes, tail_share)
    for ax, what in zip(axes, ("end-to-end latency", "time to first token"), strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"{what}, s (log)")
        ax.set_ylabel("share of requests slower (log)")
        ax.axhline(0.01, color="grey", linewidth=0.8, linestyle="--")
        ax.text(ax.get_xlim()[0], 0.01, " P99", va="bottom", fontsize=7, color="grey")
        ax.grid(True, which="both", alpha=0.3)
    for slo_s in _ttft_slos(res):
        axes[1].axvline(slo_s, color="grey", linewidth=0.8, linestyle=":")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle(f"tail latency (seed {res.repeats[0].seed}; dotted: TTFT SLOs)\n"
                 f"{scenario_title(res)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def carbon_sites_plot(res: ExperimentResult, path: Path) -> Any:
    """Per site over the run: its carbon intensity (top) and each policy's emissions
    there, gCO2/h in each carbon step (one panel per site)."""
    plt = _plt()
    cluster = res.experiment.cluster
    sites = cluster.sites
    fig, axes = plt.subplots(len(sites) + 1, 1, figsize=(11, 2.2 * (len(sites) + 1) + 0.8),
                             sharex=True, squeeze=False)
    ax0 = axes[0][0]
    for policy, runs in res.runs.items():
        run = runs[0]
        starts = run.carbon_step_starts_s
        ends = np.append(starts[1:], run.duration_s)
        hours = np.maximum(ends - starts, 1e-9) / 3600.0
        for k, site in enumerate(sites):
            g_per_h = run.site_carbon_g[site] / hours
            axes[k + 1][0].step(starts, g_per_h, where="post", label=policy, linewidth=1.1,
                                linestyle="--" if policy == BASELINE else "-")
    some = next(iter(res.runs.values()))[0]
    for site in sites:
        ax0.step(some.carbon_step_starts_s,
                 [cluster.carbon_at(site, t) for t in some.carbon_step_starts_s],
                 where="post", label=site, linewidth=1.2)
    ax0.set_ylabel("gCO2/kWh", fontsize=8)
    ax0.set_title(f"carbon per site over time\n{scenario_title(res)}", fontsize=10)
    ax0.legend(fontsize=7, loc="upper right")
    for k, site in enumerate(sites):
        axes[k + 1][0].set_ylabel(f"{site}\ngCO2/h", fontsize=8)
    axes[1][0].legend(fontsize=7, loc="upper right", ncol=2)
    for row in axes:
        row[0].grid(True, alpha=0.3)
        row[0].tick_params(labelsize=7)
    axes[-1][0].set_xlabel("simulated seconds (carbon steps of "
                           f"{cluster.carbon_step_s:g} s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return fig


def classes_plot(res: ExperimentResult, path: Path) -> Any:
    """Over the run: JouleSched's PI lambda per policy that routes with it (at each PI
    update), and the planner's instances and GPUs per request class (each window)."""
    plt = _plt()
    fig, axes = plt.subplots(3, 1, figsize=(11, 8.2), sharex=True)
    T = res.experiment.duration_s
    styles = ("-", "--", ":", "-.")
    for policy, runs in res.runs.items():
        lam = runs[0].lam_series
        if lam:
            t, v = zip(*lam, strict=True)
            if t[-1] < T:  # hold the last value to the window's end
                t, v = (*t, T), (*v, v[-1])
            k = len(axes[0].lines)  # trajectories often coincide: tell them apart
            axes[0].step(t, v, where="post", label=policy, linewidth=2.0 - 0.4 * (k % 4),
                         linestyle=styles[k % 4])
    bulk = effective_lambda(1.0, Tier.BULK)
    axes[0].set_ylabel("lambda, J per s late\n(interactive)", fontsize=8)
    axes[0].set_title(f"JouleSched lambda (bulk requests weigh it x{bulk:g}) and the "
                      f"planner's instances per class\n{scenario_title(res)}", fontsize=10)
    if axes[0].lines:
        axes[0].legend(fontsize=7, loc="upper right")
    series = plan_class_series(res)
    widths = np.diff(np.append(series.start_s, T))
    for ax, counts, unit in ((axes[1], series.instances, "instances"),
                             (axes[2], series.gpus, "GPUs")):
        if series.start_s.size:
            bottom = np.zeros(series.start_s.size)
            for r, name in enumerate(CLASS_NAMES):
                ax.bar(series.start_s, counts[:, r], width=widths, bottom=bottom, align="edge",
                       label=name, edgecolor="white", linewidth=0.5)
                bottom = bottom + counts[:, r]
            ax.set_ylim(0, 1.2 * max(float(bottom.max()), 1.0))  # room for the legend
            ax.legend(fontsize=7, loc="upper right", ncol=4)
        else:
            ax.text(0.5, 0.5, "no planner policy in this run: every instance serves every "
                    "class", ha="center", va="center", transform=ax.transAxes, fontsize=8)
        ax.set_ylabel(f"planned {unit} per\nclass (stacked)", fontsize=8)
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=7)
    axes[-1].set_xlabel("simulated seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return fig


def write_plots(res: ExperimentResult, summary: Summary, out_dir: Path, prefix: str) -> list[Path]:
    """Every plot of the run; the carbon-per-site plot only for clusters of several sites."""
    paths = [
        out_dir / f"{prefix}-energy.png",
        out_dir / f"{prefix}-latency-cdf.png",
        out_dir / f"{prefix}-tail-latency.png",
        out_dir / f"{prefix}-clock-power.png",
        out_dir / f"{prefix}-tradeoff.png",
        out_dir / f"{prefix}-lambda-classes.png",
    ]
    energy_plot(res, summary, paths[0])
    latency_plot(res, paths[1])
    tail_latency_plot(res, paths[2])
    clock_power_plot(res, paths[3])
    tradeoff_plot(res, summary, paths[4])
    classes_plot(res, paths[5])
    if len(res.experiment.cluster.sites) > 1:
        paths.append(out_dir / f"{prefix}-carbon-sites.png")
        carbon_sites_plot(res, paths[-1])
    return paths
