"""Metrics of a run, the comparison table and the JSON result file."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from joulepool.core.classes import CLASS_NAMES
from joulepool.core.energy import megajoules, megajoules_per_hour, per_hour
from joulepool.core.metrics import (
    MeanCI,
    class_mean_slowdown,
    jain_index,
    mean_ci,
    relative_change,
    slowdown,
)
from joulepool.sim.engine import RunResult
from joulepool.sim.policies import POLICIES
from joulepool.sim.runner import ExperimentResult, summarise_floor
from joulepool.sim.tables import ProfileTable
from joulepool.sim.trace import ATTRIBUTION, VENDORED_NAME
from joulepool.sim.workload import Workload

FloatArray = npt.NDArray[np.float64]
BASELINE = "round-robin"


@dataclass(frozen=True)
class Column:
    key: str
    head: str
    fmt: str
    width: int


COLUMNS = (
    Column("energy_mj_per_h", "MJ/h", "{:.1f}", 8),
    Column("j_per_token", "J/tok", "{:.3f}", 7),
    Column("p50_ms", "P50 ms", "{:,.0f}", 8),
    Column("p99_ms", "P99 ms", "{:,.0f}", 9),
    Column("ttft_attainment", "TTFT ok", "{:.1%}", 8),
    Column("tpot_attainment", "TPOT ok", "{:.1%}", 8),
    Column("deadline_miss_rate", "miss", "{:.2%}", 7),
    Column("jain_fairness", "Jain", "{:.3f}", 6),
    Column("gco2_per_h", "gCO2/h", "{:,.0f}", 10),
    Column("energy_vs_rr", "E vs RR", "{:+.1%}", 8),
    Column("co2_vs_rr", "CO2 vs RR", "{:+.1%}", 9),
    Column("x_floor", "x floor", "{:.2f}", 7),
)


def ideal_latency_s(workload: Workload, tables: dict[str, ProfileTable]) -> FloatArray:
    """Latency of each request alone on the fastest instance type at f_max (prefill + decode)."""
    best = np.full(workload.requests, np.inf)
    for tab in tables.values():
        top = tab.top
        t = (tab.prefill_s_per_token[top] * workload.input_tokens
             + np.maximum(workload.output_tokens - 1, 0) * tab.itl_s[top][1])
        best = np.minimum(best, t)
    return np.asarray(np.maximum(best, 1e-6), dtype=np.float64)


def x_floor(run: RunResult) -> float:
    """The run's window energy over the energy floor of the same work: the floor of what
    it did inside the window (``run.work_floor``, set by the experiment runner). NaN when
    that floor was not computed or is infeasible."""
    work = run.work_floor
    if work is None or not work.feasible:
        return math.nan
    return run.energy_j / work.energy_j


def run_metrics(
    run: RunResult, workload: Workload, tables: dict[str, ProfileTable]
) -> dict[str, Any]:
    T = run.duration_s
    arrival = workload.arrival_s
    finished = ~np.isnan(run.t_done)
    e2e = np.where(finished, run.t_done - arrival, np.inf)
    ttft = np.where(np.isnan(run.t_first), np.inf, run.t_first - arrival)
    out = workload.output_tokens
    decode_tokens = np.maximum(out - 1, 1)
    tpot = np.where(out > 1, (run.t_done - run.t_first) / decode_tokens, 0.0)
    tpot = np.where(finished, tpot, np.inf)
    n = workload.requests
    energy = run.energy_j
    jpt = energy / run.tokens_in_window if run.tokens_in_window > 0 else math.nan
    if n:
        p50, p99 = (float(v) * 1e3 for v in np.quantile(e2e, [0.5, 0.99], method="inverted_cdf"))
    else:
        p50 = p99 = math.nan
    sd = slowdown(np.where(finished, e2e, np.nan), ideal_latency_s(workload, tables))
    per_class = class_mean_slowdown(sd, workload.cls, len(CLASS_NAMES))
    mean_w = float(np.mean(e2e[finished])) if finished.any() else math.nan
    busy: dict[str, float] = {}
    gpus: dict[str, int] = {}
    for g, prod in enumerate(run.gpu_product):
        busy[prod] = busy.get(prod, 0.0) + float(run.gpu_busy_s[g])
        gpus[prod] = gpus.get(prod, 0) + 1
    served = run.instance_product
    bulk = workload.bulk
    share_tokens = {}
    share_bulk = {}
    for k, prod in enumerate(run.products):
        on = served == k
        share_tokens[prod] = float(out[on].sum() / max(out.sum(), 1))
        share_bulk[prod] = float((on & bulk).sum() / max(int(bulk.sum()), 1))
    return {
        "seed": run.seed,
        "requests": n,
        "finished": int(finished.sum()),
        "tokens_in_window": run.tokens_in_window,
        "energy_j": energy,
        "energy_mj_per_h": megajoules_per_hour(energy, T),
        "j_per_token": jpt,
        "p50_ms": p50,
        "p99_ms": p99,
        "ttft_attainment": float(np.mean(ttft <= workload.ttft_slo_s)) if n else math.nan,
        "tpot_attainment": float(np.mean(tpot <= workload.tpot_slo_s)) if n else math.nan,
        "deadline_miss_rate": float(np.mean(e2e > workload.deadline_s)) if n else math.nan,
        "jain_fairness": jain_index(per_class),
        "class_mean_slowdown": {c: float(v) for c, v in zip(CLASS_NAMES, per_class, strict=True)},
        "gco2_per_h": per_hour(run.carbon_g, T),
        "x_floor": x_floor(run),
        "utilisation": {p: busy[p] / (gpus[p] * T) for p in busy},
        "token_share": share_tokens,
        "bulk_share": share_bulk,
        "little_l": run.little_l,
        "little_lambda_w": n / T * mean_w,
        "wall_s": run.wall_s,
        "sim_requests_per_s": n / run.wall_s if run.wall_s > 0 else math.nan,
        "site_energy_mj": {s: megajoules(float(v.sum())) for s, v in run.site_energy_j.items()},
        "notes": list(run.notes),
        # the engine's: prompts over the context, outputs cut at it, KV preemptions,
        # instances started with a model load
        "rejected": run.rejected,
        "truncated": run.truncated,
        "preemptions": run.preemptions,
        "startups": run.startups,
    }


@dataclass
class Summary:
    """Per policy: metrics of every repeat and their means with 95 % intervals."""

    runs: dict[str, list[dict[str, Any]]]
    stats: dict[str, dict[str, MeanCI]]


def summarise(res: ExperimentResult) -> Summary:
    runs: dict[str, list[dict[str, Any]]] = {}
    for policy, results in res.runs.items():
        runs[policy] = [
            run_metrics(r, res.repeats[i].workload, res.tables)
            for i, r in enumerate(results)
        ]
    base = runs.get(BASELINE)
    for ms in runs.values():
        for i, m in enumerate(ms):
            if base is not None and i < len(base):
                m["energy_vs_rr"] = relative_change(m["energy_j"], base[i]["energy_j"])
                m["co2_vs_rr"] = relative_change(m["gco2_per_h"], base[i]["gco2_per_h"])
            else:
                m["energy_vs_rr"] = m["co2_vs_rr"] = math.nan
    stats: dict[str, dict[str, MeanCI]] = {}
    keys = [c.key for c in COLUMNS] + ["sim_requests_per_s", "little_l", "little_lambda_w"]
    for policy, ms in runs.items():
        stats[policy] = {k: mean_ci([m[k] for m in ms]) for k in keys}
    return Summary(runs, stats)


def _cell(col: Column, ci: MeanCI, with_ci: bool) -> str:
    if ci.n == 0 or (isinstance(ci.mean, float) and math.isnan(ci.mean)):
        return "-"
    text = col.fmt.format(ci.mean)
    if with_ci and not math.isnan(ci.half_width) and col.key in (
        "energy_mj_per_h", "energy_vs_rr", "co2_vs_rr"
    ):
        hw = col.fmt.replace("+", "").format(ci.half_width)
        text += f"±{hw}"
    return text


def render_table(res: ExperimentResult, summary: Summary) -> str:
    with_ci = res.experiment.repeat > 1
    name_w = max(12, *(len(p) for p in summary.stats))
    widths = [max(c.width, len(c.head)) + (7 if with_ci and c.key in (
        "energy_mj_per_h", "energy_vs_rr", "co2_vs_rr") else 0) for c in COLUMNS]
    head = f"{'policy':<{name_w}}" + "".join(
        f" {c.head:>{w}}" for c, w in zip(COLUMNS, widths, strict=True)
    )
    lines = [head, "-" * len(head)]
    for policy, st in summary.stats.items():
        cells = [_cell(c, st[c.key], with_ci) for c in COLUMNS]
        lines.append(f"{policy:<{name_w}}" + "".join(
            f" {x:>{w}}" for x, w in zip(cells, widths, strict=True)))
    floors = [r.floor for r in res.repeats]
    if all(f.feasible for f in floors):
        mj = mean_ci([megajoules_per_hour(f.energy_j, f.horizon_s) for f in floors])
        jpt = mean_ci([f.joules_per_token for f in floors])
        cells = ["-"] * len(COLUMNS)
        cells[0] = f"{mj.mean:.1f}"
        cells[1] = f"{jpt.mean:.3f}"
        cells[-1] = "1.00"
        lines.append(f"{'energy floor':<{name_w}}" + "".join(
            f" {x:>{w}}" for x, w in zip(cells, widths, strict=True)))
    return "\n".join(lines)


def legend(res: ExperimentResult) -> list[str]:
    n = res.experiment.repeat
    ci = f"; ± = 95 % CI over {n} repeats (Student t)" if n > 1 else ""
    return [
        "MJ/h, J/tok: energy of every GPU (idle ones included) over the window, per output "
        "token generated in it; P50/P99: end-to-end latency; TTFT/TPOT ok: share of requests "
        "within their SLO; miss: deadline misses (unfinished count as missed); Jain: fairness "
        "of per-class (SS/SL/LS/LL) mean slowdown vs running alone on the fastest GPU; "
        "x floor: window energy over the LP energy floor of the work done in the window "
        "(its prefilled prompts and generated tokens)" + ci,
    ]


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, MeanCI):
        return {"mean": _jsonable(x.mean), "ci95_half_width": _jsonable(x.half_width), "n": x.n}
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, float | np.floating):
        v = float(x)
        return None if math.isnan(v) or math.isinf(v) else v
    return x


def result_document(
    res: ExperimentResult, summary: Summary, files: Sequence[str], options: dict[str, Any]
) -> dict[str, Any]:
    exp = res.experiment
    return _jsonable({
        "tool": "joulepool simulate",
        "options": options,
        "trace": exp.trace.name,
        "attribution": ATTRIBUTION if exp.trace.name == VENDORED_NAME else None,
        "cluster": exp.cluster.name,
        "model": exp.cluster.model,
        "duration_s": exp.duration_s,
        "seed": exp.seed,
        "repeat": exp.repeat,
        "description": res.description,
        "capacity": {
            "static_instances": res.capacity.instances,
            "per_instance_rps": res.capacity.per_mode_rps,
            "total_rps": res.capacity.total_rps,
            "round_robin_stable_rps": res.capacity.rr_stable_rps,
            "per_instance_slo_rps": res.capacity.per_mode_slo_rps,
            "slo_rps": res.capacity.slo_rps,
        },
        "slos": {"name": exp.slos.name, "ttft_short_prompt_s": exp.slos.ttft_short_prompt_s,
                 "ttft_long_prompt_s": exp.slos.ttft_long_prompt_s,
                 "tpot_s": exp.slos.tpot_s, "source": exp.slos.source},
        "repeats": [
            {
                "seed": r.seed,
                "requests": r.workload.requests,
                "scale": r.workload.scale,
                "mean_rate_rps": r.workload.mean_rate_rps,
                "floor": {
                    "feasible": r.floor.feasible,
                    "status": r.floor.status,
                    "energy_mj_per_h": megajoules_per_hour(r.floor.energy_j, r.floor.horizon_s),
                    "j_per_token": r.floor.joules_per_token,
                    "idle_share": r.floor.idle_j / r.floor.energy_j if r.floor.feasible else None,
                    "usage": r.floor.usage,
                    "slo_relaxed": r.floor.slo_relaxed,
                    "summary": summarise_floor(r.floor),
                },
                "plans": [p.describe() for p in r.plans],
            }
            for r in res.repeats
        ],
        "policies": {
            p: {
                "description": POLICIES[p].description,
                "summary": summary.stats[p],
                "runs": summary.runs[p],
            }
            for p in summary.runs
        },
        "files": list(files),
        "wall_s": res.wall_s,
    })


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class ClassSeries:
    """The planner's allocation over a run, one row per plan window (by start time)."""

    start_s: FloatArray  # [W] window starts, s
    instances: npt.NDArray[np.int64]  # [W, R] instances planned for each class
    gpus: npt.NDArray[np.int64]  # [W, R] GPUs those instances hold


def plan_class_series(res: ExperimentResult, repeat: int = 0) -> ClassSeries:
    """Instances and GPUs per class (:data:`CLASS_NAMES`) in each plan window of
    ``repeat`` (empty arrays when no policy used the planner)."""
    plans = sorted(res.repeats[repeat].plans, key=lambda p: p.start_s)
    n = len(CLASS_NAMES)
    inst = np.zeros((len(plans), n), dtype=np.int64)
    gpus = np.zeros((len(plans), n), dtype=np.int64)
    for w, plan in enumerate(plans):
        for pi in plan.instances:
            profile = res.experiment.cluster.mode_profile(pi.mode)
            inst[w, pi.cls] += pi.count
            gpus[w, pi.cls] += pi.count * (profile.gpus if profile is not None else 1)
    return ClassSeries(np.array([p.start_s for p in plans], dtype=np.float64), inst, gpus)
