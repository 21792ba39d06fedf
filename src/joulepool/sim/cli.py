"""``joulepool simulate``: replay a trace on a simulated cluster and compare policies."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from joulepool.sim.cluster import SimCluster
    from joulepool.sim.engine import EngineParams
    from joulepool.sim.report import Summary
    from joulepool.sim.runner import Experiment, ExperimentResult


def configure(parser: argparse.ArgumentParser) -> None:
    """The ``simulate`` command's description and arguments."""
    parser.description = (
        "Replay a production LLM trace on a simulated heterogeneous GPU cluster and compare "
        "scheduling policies on energy, carbon, latency and SLOs. With no arguments: the "
        "joulesched-320 cluster, the bundled Azure 2023 conversation trace, every policy."
    )
    _add_scenario_arguments(parser)
    _add_run_arguments(parser)
    _add_model_arguments(parser)


def _add_scenario_arguments(parser: argparse.ArgumentParser) -> None:
    """What is simulated: cluster, trace, policies, window, offered load, SLO set."""
    from joulepool.core.classes import SLO_SETS
    from joulepool.sim.cluster import DEFAULT_LOAD

    parser.add_argument("--cluster", default="joulesched-320", metavar="NAME|FILE",
                        help="built-in cluster (joulesched-320, freesh-3site) or a cluster YAML "
                             "(default: %(default)s)")
    parser.add_argument("--trace", metavar="FILE",
                        help="trace CSV with TIMESTAMP,ContextTokens,GeneratedTokens "
                             "(default: the bundled Azure 2023 conversation trace)")
    parser.add_argument("--policies", default="all",
                        help="comma-separated policies: round-robin, least-loaded, joulesched, "
                             "freesh, combined, max-clock, miad-only, planner-only (default: all "
                             "of these); also joulesched-router, JouleSched through the "
                             "production request router itself")
    parser.add_argument("--duration", type=float, metavar="SECONDS",
                        help="simulated window in seconds (default: the cluster's, "
                             "600 for joulesched-320, 3600 for freesh-3site)")
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--load", type=float, metavar="F",
                      help="offered load as a fraction of the cluster's capacity at SLO: the "
                           "req/s its static deployment serves within the SLOs under "
                           "least-loaded (core's serving_point at the trace's mean request, "
                           "summed over instances), so 0.5 = half of what it can serve "
                           f"(default {DEFAULT_LOAD:g} on the built-in clusters; every run "
                           "prints its offered rate's share of that capacity)")
    load.add_argument("--rate", type=float, metavar="RPS",
                      help="mean arrival rate, req/s (NHPP with the trace's per-minute shape)")
    load.add_argument("--scale", type=float, metavar="X",
                      help="multiply the trace's per-minute rates by X (NHPP)")
    load.add_argument("--replay", action="store_true",
                      help="replay the trace's own timestamps and tokens as they are")
    parser.add_argument("--slos", default="freesh", choices=sorted(SLO_SETS), metavar="SET",
                        help="interactive-tier SLOs of every class: "
                             + "; ".join(s.describe() for s in SLO_SETS.values())
                             + " (default %(default)s); bulk gets --bulk-slack times them")


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """How it is run: seeds and repeats, processes, outputs."""
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="independent repeats (seeds seed..seed+N-1) for 95%% confidence "
                             "intervals (default 1)")
    parser.add_argument("--jobs", type=int, metavar="N",
                        help="parallel processes (default: CPUs available)")
    parser.add_argument("--out", default="results", metavar="DIR",
                        help="directory for the JSON result and PNG plots (default: results/)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress on stderr (a bar on a terminal, else a line per "
                             "finished policy run)")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The models' assumptions: workload mix, predictor, planner, router, engine."""
    parser.add_argument("--mix", default="0.64,0.28,0.08", metavar="CHAT,RAG,BATCH",
                        help="workload shares (default JouleSched's 0.64,0.28,0.08)")
    parser.add_argument("--predictor-mae", type=float, default=0.12, metavar="F",
                        help="response-length predictor error (default JouleSched's 0.12)")
    parser.add_argument("--bulk-slack", type=float, default=10.0, metavar="K",
                        help="bulk tier SLOs and deadlines are K x the interactive ones "
                             "(default 10, assumed)")
    parser.add_argument("--alpha", type=float, default=1.1,
                        help="planner demand headroom (default FREESH's 1.1)")
    parser.add_argument("--headroom", type=float, default=1.0, metavar="F",
                        help="share of core's queueing headroom the planner sizes pools with: "
                             "1 (default) keeps P(prefill wait > TTFT SLO - prefill) <= 1 %% "
                             "and mean TPOT <= 90 %% of its SLO; 0 plans to the fluid model's "
                             "SLO limits (sensitivity)")
    parser.add_argument("--no-share-instances", dest="share_instances",
                        action="store_false",
                        help="the planner gives every class instances of its own (FREESH's "
                             "formulation) instead of letting the classes share instances "
                             "(docs/planner.md, 'Shared instances')")
    parser.add_argument("--eps-at-clock", action="store_true",
                        help="JouleSched reads eps at each GPU's current clock, not f_max "
                             "(with MIAD the router then chases down-clocked GPUs)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, metavar="N",
                        help="engine: vLLM's token budget per step (decode tokens + prefill "
                             "chunk); default vLLM V1's: 8192 on GPUs with >= 70 GiB, else 2048")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None, metavar="F",
                        help="engine: vLLM's share of GPU memory for weights and KV cache "
                             "(default vLLM's 0.9)")
    parser.add_argument("--no-kv-cache", action="store_true",
                        help="engine: no KV-cache capacity (no admission limit, preemption or "
                             "context bound)")
    parser.add_argument("--no-startup", action="store_true",
                        help="engine: instances the planner starts serve at once (no model "
                             "load time or energy)")
    parser.add_argument("--assume", action="append", default=[], metavar="KEY=VALUE",
                        help="sensitivity: override an assumed profile figure: gamma, "
                             "beta_decode, beta_prefill, memory_power_share, voltage_knee, "
                             "bandwidth_clock (ratios of f_max), prefill_scale, "
                             "idle_w.<PRODUCT> (repeatable)")


def _fail(msg: str) -> Any:
    from joulepool.cli import UsageError

    raise UsageError(msg)


def _parse_args(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        mix = tuple(float(x) for x in str(args.mix).split(","))
    except ValueError:
        _fail(f"--mix {args.mix!r}: expected three numbers like 0.64,0.28,0.08")
    if len(mix) != 3 or any(x < 0 for x in mix) or abs(sum(mix) - 1.0) > 1e-6 or mix[2] >= 1:
        _fail(f"--mix {args.mix!r}: three non-negative shares summing to 1 (batch below 1)")
    out["mix"] = mix
    assumptions: dict[str, float] = {}
    for item in args.assume:
        key, sep, value = str(item).partition("=")
        try:
            assumptions[key.strip()] = float(value)
        except ValueError:
            _fail(f"--assume {item!r}: expected KEY=NUMBER")
        if not sep:
            _fail(f"--assume {item!r}: expected KEY=NUMBER")
    out["assume"] = assumptions
    for name in ("duration", "load", "rate", "scale"):
        v = getattr(args, name)
        if v is not None and not (v > 0 and v < float("inf")):
            _fail(f"--{name} must be a positive number, got {v}")
    if args.repeat < 1:
        _fail("--repeat must be >= 1")
    if args.jobs is not None and args.jobs < 1:
        _fail("--jobs must be >= 1")
    if not 0 <= args.predictor_mae < 5:
        _fail("--predictor-mae must be in [0, 5)")
    if args.bulk_slack < 1:
        _fail("--bulk-slack must be >= 1")
    if args.alpha < 1:
        _fail("--alpha must be >= 1")
    if not 0 <= args.headroom <= 1:
        _fail("--headroom must be in [0, 1]")
    return out


def _arrival(args: argparse.Namespace, cluster: SimCluster) -> tuple[str, float]:
    """(arrival mode, value) from --replay/--rate/--scale/--load or the cluster's default."""
    if args.replay:
        return "replay", 1.0
    if args.rate is not None:
        return "rate", args.rate
    if args.scale is not None:
        return "scale", args.scale
    if args.load is not None:
        return "load", args.load
    return cluster.default_arrival


def _cluster(args: argparse.Namespace, assume: dict[str, float]) -> SimCluster:
    """The cluster named by --cluster, with --assume's profile overrides."""
    from dataclasses import replace

    from joulepool.sim.cluster import ClusterError, resolve_cluster
    from joulepool.sim.runner import apply_assumptions

    try:
        cluster = resolve_cluster(args.cluster)
    except ClusterError as exc:
        _fail(str(exc))
    if assume:
        try:
            cluster = replace(cluster, profiles=apply_assumptions(cluster.profiles, assume))
        except ValueError as exc:
            _fail(f"--assume: {exc}")
    return cluster


def _experiment(args: argparse.Namespace) -> Experiment:
    """The experiment the arguments describe (bad input: UsageError, exit 2)."""
    from joulepool.core.classes import slo_set
    from joulepool.sim.policies import parse_policies
    from joulepool.sim.runner import Experiment, default_jobs
    from joulepool.sim.trace import TraceError, load_trace

    extra = _parse_args(args)
    try:
        policies = parse_policies(args.policies)
    except ValueError as exc:
        _fail(f"--policies: {exc}")
    cluster = _cluster(args, extra["assume"])
    try:
        trace = load_trace(args.trace)
    except TraceError as exc:
        _fail(str(exc))
    mode, value = _arrival(args, cluster)
    return Experiment(
        cluster=cluster, trace=trace, duration_s=args.duration or cluster.duration_s,
        arrival_mode=mode,  # type: ignore[arg-type]
        arrival_value=value, policies=policies, seed=args.seed, repeat=args.repeat,
        jobs=args.jobs or default_jobs(), mix=extra["mix"], predictor_mae=args.predictor_mae,
        bulk_slack=args.bulk_slack, alpha=args.alpha, headroom_scale=args.headroom,
        share_instances=args.share_instances,
        params=_engine_params(args), slos=slo_set(args.slos),
    )


def _engine_params(args: argparse.Namespace) -> EngineParams:
    """The engine options (bad values: UsageError, exit 2)."""
    from joulepool.sim.engine import EngineParams

    util = args.gpu_memory_utilization
    try:
        return EngineParams(
            eps_at_current_clock=args.eps_at_clock,
            max_num_batched_tokens=args.max_num_batched_tokens,
            gpu_memory_utilization=EngineParams.gpu_memory_utilization if util is None else util,
            kv_cache=not args.no_kv_cache, startup=not args.no_startup,
        )
    except ValueError as exc:
        return _fail(f"engine options: {exc}")


def _run_with_progress(exp: Experiment, quiet: bool) -> ExperimentResult:
    """Run ``exp``, showing progress on stderr unless ``quiet``: a progress bar on a
    terminal, else one line as the run starts and one as each policy run ends (a
    piped or logged ``make demo`` shows it is alive too)."""
    from joulepool.sim.runner import WorkerStartError, run_experiment

    bar: Any = None
    log = None
    if not quiet and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=round(exp.duration_s * len(exp.policies) * exp.repeat), unit="sim-s",
                   desc="simulating", file=sys.stderr, leave=False)
    elif not quiet:
        log = _progress_lines(exp)

    def progress(done: float, total: float) -> None:
        if bar is not None:
            bar.n = min(round(done), bar.total)
            bar.refresh()

    try:
        return run_experiment(exp, progress=progress, log=log)
    except ValueError as exc:
        return _fail(str(exc))
    except WorkerStartError as exc:  # not bad input: exit 1 with the reason, no traceback
        print(f"joulepool simulate: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        if bar is not None:
            bar.close()


def _progress_lines(exp: Experiment) -> Callable[[str], None]:
    """Announce the run on stderr; the returned callback prints one line per finished
    policy run (``run_experiment``'s ``log``)."""
    runs = len(exp.policies) * exp.repeat
    t0 = time.perf_counter()
    print(f"simulating {exp.duration_s:g} s of {exp.cluster.name} under {runs} policy "
          f"run(s) in {min(exp.jobs, runs)} process(es)...", file=sys.stderr, flush=True)
    done = [0]

    def log(line: str) -> None:
        done[0] += 1
        print(f"  [{done[0]}/{runs}, {time.perf_counter() - t0:.0f} s] {line}",
              file=sys.stderr, flush=True)

    return log


def _print_report(args: argparse.Namespace, exp: Experiment, res: ExperimentResult,
                  summary: Summary) -> None:
    from joulepool.sim.report import legend, render_table
    from joulepool.sim.runner import summarise_floor

    trace_name = "bundled Azure LLM inference trace 2023 (conversation)" if args.trace is None \
        else str(args.trace)
    print(f"joulepool simulate: {exp.cluster.name}, {exp.duration_s:g} s simulated, "
          f"{len(exp.policies)} policies x {args.repeat} repeat(s), seed {args.seed}")
    print(f"trace: {trace_name}")
    for line in res.description:
        print(f"  {line}")
    print()
    print(render_table(res, summary))
    for line in legend(res):
        print(line)
    print()
    print(summarise_floor(res.repeats[0].floor))
    for plan in res.repeats[0].plans:
        print(plan.describe())
    for policy, runs in summary.runs.items():
        for note in runs[0]["notes"]:
            if not note.startswith("plan @"):
                print(f"{policy}: {note}")


def _write_outputs(args: argparse.Namespace, out_dir: Path, stem: str, res: ExperimentResult,
                   summary: Summary) -> list[str]:
    """Plots (unless --no-plots) and the JSON result; returns the files written."""
    from joulepool.sim.report import result_document, write_json

    files: list[str] = []
    if not args.no_plots:
        from joulepool.sim.plots import write_plots

        files += [str(p) for p in write_plots(res, summary, out_dir, stem)]
    json_path = out_dir / f"{stem}-result.json"
    options = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "command"}
    write_json(json_path, result_document(res, summary, files, options))
    files.append(str(json_path))
    return files


def run(args: argparse.Namespace) -> int:
    from joulepool.sim.report import summarise
    from joulepool.sim.trace import ATTRIBUTION, vendored_trace_path

    t0 = time.perf_counter()
    exp = _experiment(args)
    out_dir = Path(args.out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _fail(f"--out {out_dir}: cannot create: {exc.strerror or exc}")
    res = _run_with_progress(exp, args.quiet)
    summary = summarise(res)
    _print_report(args, exp, res, summary)
    files = _write_outputs(args, out_dir, exp.cluster.name, res, summary)
    rps = [s["sim_requests_per_s"].mean for s in summary.stats.values()]
    print()
    print(f"engine speed in this run: {min(rps):,.0f}-{max(rps):,.0f} simulated requests per "
          f"wall-clock second per policy run ({exp.jobs} process(es) sharing the CPUs; "
          "`joulepool bench sim` measures it alone); "
          f"wall time {time.perf_counter() - t0:.1f} s")
    print("results: " + "  ".join(files))
    if args.trace is None or Path(args.trace).resolve() == vendored_trace_path().resolve():
        print(f"trace data: {ATTRIBUTION}")
    return 0
