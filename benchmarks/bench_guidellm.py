"""The routing proxy under a published LLM load generator, GuideLLM, offline: proxy vs direct.

``joulepool bench proxy`` drives the proxy with its own aiohttp client. This benchmark
drives it with GuideLLM (the vLLM project's load generator for OpenAI-compatible
servers), so that the proxy is seen through someone else's client and someone else's
figures: GuideLLM's own requests per second, TTFT, inter-token latency (ITL) and
request latency, median and p99.

What it runs (loopback only, started as ``bench proxy`` starts them, with its
functions): ``--engines`` instant OpenAI engines (``bench_proxy.serve_engine``: they
answer at once, streaming ``--output-tokens`` chunks, so what differs between the two
targets is the proxy's own work) and one ``joulepool router --no-cluster`` whose
endpoints file lists them. GuideLLM then runs against the proxy and against the first
engine directly, one ``guidellm run`` per target and run (the targets' order alternates
between runs): a ``--profile`` (constant or poisson) benchmark at each of ``--rates``
requests/s for ``--seconds`` seconds (the first ``--warmup`` share left out of the
figures), synthetic prompts of ``--prompt-tokens`` tokens asking for
``--output-tokens``, streaming unless ``--no-stream``. Each step and GuideLLM's command
are printed, GuideLLM's console output shown as it runs (``--quiet``: not); the table at
the end puts its figures side by side with the ratio proxy / direct (medians over
``--runs``). GuideLLM's client (httpx, worker processes) costs more CPU than the proxy
on a shared 2-core machine: the absolute figures are the load generator's as much as
the server's, the ratios are the point; with a few dozen requests per rate, a p99 is
close to the maximum.

Setup, outside the project's environment (never in its test extra): a virtual
environment, by default ``~/.cache/joulepool/guidellm-<version>`` (``--venv DIR``),
created on first use from ``--python`` (>= 3.10, default this interpreter) with ``pip
install torch==2.13.0 guidellm==0.8.1`` (``--torch``, ``--guidellm`` change the pins;
torch named in the same command so that pip takes that release, a CPU build where one
is on the machine's disk, instead of a CUDA build of several GB). GuideLLM brings
transformers, datasets, pyarrow, pandas and faker: about 1.5 GB in all (754 MB of it
torch), one to three minutes to install here; reused while its recorded requirements
and Python version match (:mod:`joulepool.toolenv`, shared with ``bench
inference_perf``). No model hub is reachable, so the tokenizer GuideLLM needs to size
its prompts is made locally (:func:`joulepool.toolenv.tokenizer_files`): a word-level
tokenizer over the word list of Faker, the library GuideLLM writes its synthetic
prompts with, so that each prompt word is one token and none is unknown (checked in
the venv before the load starts); ``HF_HUB_OFFLINE=1`` keeps GuideLLM from fetching
anything. Exit 2 with the reason when GuideLLM cannot be set up (no interpreter >=
3.10, pip fails: e.g. no torch wheel reachable) or an argument is bad; 1 when a
GuideLLM run fails or a request errs.

    joulepool bench guidellm [--rates 5,20] [--seconds 10] [--warmup 0.1] [--runs 1]
        [--engines 2] [--prompt-tokens 128] [--output-tokens 32] [--profile constant]
        [--no-stream] [--venv DIR] [--python PATH] [--quiet] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from joulepool import toolenv
from joulepool.toolenv import SetupError, tail, tokenizer_files

#: ``joulepool bench all`` skips this benchmark (it installs GuideLLM's 1.5 GB venv on
#: first use): run it by name.
IN_ALL = False
GUIDELLM_REQUIREMENT = "guidellm==0.8.1"
TORCH_REQUIREMENT = "torch==2.13.0"
MIN_PYTHON = (3, 10)  # guidellm 0.8's floor

#: GuideLLM's figures reported here: (label, metric in its JSON report, statistic,
#: scale to the unit in the label). Requests per second: the mean over the benchmark,
#: as GuideLLM's own console table gives it.
FIGURES: tuple[tuple[str, str, str, float], ...] = (
    ("req/s", "requests_per_second", "mean", 1.0),
    ("TTFT p50 ms", "time_to_first_token_ms", "p50", 1.0),
    ("TTFT p99 ms", "time_to_first_token_ms", "p99", 1.0),
    ("ITL p50 ms", "inter_token_latency_ms", "p50", 1.0),
    ("ITL p99 ms", "inter_token_latency_ms", "p99", 1.0),
    ("latency p50 ms", "request_latency", "p50", 1e3),
    ("latency p99 ms", "request_latency", "p99", 1e3),
)
LABELS = tuple(label for label, *_ in FIGURES)


# --------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------
def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be finite and > 0: {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1): {text!r}")
    return value


def _proxy_bench() -> ModuleType:
    """``benchmarks/bench_proxy.py``: the engines, the router and the tool-neutral
    pieces (argument types, medians, the side-by-side table) both tool benches share."""
    from joulepool.bench import load_benchmark

    return load_benchmark("proxy")


def default_venv(guidellm_requirement: str = GUIDELLM_REQUIREMENT) -> Path:
    """GuideLLM's cached venv for this pin (:func:`joulepool.toolenv.default_venv`)."""
    return toolenv.default_venv("guidellm", guidellm_requirement)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (module docstring); argparse exits 2 on a bad argument."""
    shared = _proxy_bench()
    ap = argparse.ArgumentParser(prog="bench_guidellm",
                                 description=(__doc__ or "").split("\n\n")[0])
    shared.load_generator_arguments(ap, "GuideLLM", "GuideLLM benchmark")
    ap.add_argument("--seconds", type=_positive_float, default=10.0,
                    help="duration of each rate's benchmark")
    ap.add_argument("--warmup", type=_fraction, default=0.1,
                    help="share of each benchmark's duration GuideLLM leaves out of its "
                         "figures at the start, in [0, 1) (default 0.1)")
    ap.add_argument("--venv", type=Path, default=None,
                    help="GuideLLM's virtual environment (default: under ~/.cache/joulepool)")
    ap.add_argument("--python", default=sys.executable,
                    help="interpreter that creates the venv (>= 3.10; default this one)")
    ap.add_argument("--guidellm", default=GUIDELLM_REQUIREMENT,
                    help=f"pip requirement for GuideLLM (default {GUIDELLM_REQUIREMENT})")
    ap.add_argument("--torch", default=TORCH_REQUIREMENT,
                    help=f"pip requirement for torch, installed with it (default "
                         f"{TORCH_REQUIREMENT})")
    args = ap.parse_args(argv)
    if args.venv is None:
        try:
            args.venv = default_venv(args.guidellm)
        except SetupError as exc:
            ap.error(str(exc))
    return args


# --------------------------------------------------------------------------
# GuideLLM's environment
# --------------------------------------------------------------------------
def _venv_bin(venv: Path, name: str) -> Path:
    return venv / "bin" / name


def ensure_guidellm(venv: Path, python: str, requirements: Sequence[str]) -> Path:
    """The ``guidellm`` executable of ``venv``, made or reused by
    :func:`joulepool.toolenv.ensure_venv` from ``python`` (>= :data:`MIN_PYTHON`)."""
    return toolenv.ensure_venv(venv, python, requirements, "guidellm", "guidellm",
                               MIN_PYTHON, "about 1.5 GB with torch, transformers, "
                               "datasets; a minute or more")


# --------------------------------------------------------------------------
# The local tokenizer
# --------------------------------------------------------------------------
_FAKER_WORDS = "from faker import Faker; print('\\n'.join(Faker().get_words_list()))"
_CHECK_TOKENIZER = """
import sys
from faker import Faker
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
faker = Faker()
faker.seed_instance(0)
ids = tok.encode(faker.text(max_nb_chars=5000))
print(len(tok), len(ids), ids.count(tok.unk_token_id))
"""


def build_tokenizer(venv: Path, directory: Path) -> int:
    """Write :func:`tokenizer_files` over Faker's word list (read in ``venv``) into
    ``directory`` and check there that transformers loads it and that Faker text has no
    unknown token; the vocabulary size. SetupError when either fails."""
    python = str(_venv_bin(venv, "python"))
    words = toolenv.setup_step([python, "-c", _FAKER_WORDS], "reading Faker's word list")
    if words.returncode != 0:
        raise SetupError(f"cannot read Faker's word list in {venv}:\n{tail(words.stderr)}")
    try:
        files = tokenizer_files(words.stdout.split())
    except ValueError as exc:
        raise SetupError(f"no tokenizer over Faker's word list in {venv}: {exc}") from None
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (directory / name).write_text(content)
    check = toolenv.setup_step([python, "-c", _CHECK_TOKENIZER, str(directory)],
                               "checking the local tokenizer",
                               env={**os.environ, **toolenv.OFFLINE_ENV})
    if check.returncode != 0:
        raise SetupError(f"transformers cannot load the local tokenizer {directory}:\n"
                         f"{tail(check.stderr)}")
    try:
        size, tokens, unknown = (int(x) for x in check.stdout.split()[-3:])
    except ValueError:
        raise SetupError(f"the tokenizer check printed {check.stdout!r}, not three "
                         f"counts") from None
    if unknown:
        raise SetupError(f"the local tokenizer leaves {unknown} of {tokens} tokens of "
                         f"Faker text unknown")
    print(f"guidellm: local word-level tokenizer, {size} tokens, in {directory} (Faker "
          f"text: {tokens} tokens, none unknown)", flush=True)
    return size


# --------------------------------------------------------------------------
# Runs and figures
# --------------------------------------------------------------------------
def scenario(target: str, model: str, args: argparse.Namespace, tokenizer: Path,
             report: Path) -> dict[str, Any]:
    """GuideLLM's scenario (its ``run --scenario`` file): the OpenAI HTTP backend at
    ``http://<target>`` on ``/v1/completions`` (its health probe, ``GET /health``, on:
    the proxy and the instant engines answer it), a sub-benchmark per rate of
    ``args.rates`` (one after the other, in one process), synthetic text, the local
    tokenizer, the JSON report at ``report``; ``args.warmup`` of each benchmark's
    duration left out of its figures (GuideLLM's warm-up phase: its worker processes
    and connections start then)."""
    return {
        "metadata": {"name": "joulepool-bench-guidellm"},
        "spec": {
            "backend": {"kind": "openai_http", "target": f"http://{target}", "model": model,
                        "request_format": "/v1/completions", "validate_backend": True,
                        "stream": bool(args.stream)},
            "profile": {"kind": args.profile, "rate": [args.rates[0]],
                        "warmup": args.warmup},
            "constraints": [{"kind": "max_duration", "seconds": args.seconds}],
            "tokenizer": {"kind": "hf_auto", "model": str(tokenizer)},
            "data": [{"kind": "synthetic_text", "prompt_tokens": args.prompt_tokens,
                      "output_tokens": args.output_tokens}],
            "outputs": [{"kind": "json", "path": str(report)}],
        },
        "benchmarks": [{"profile.rate": rate} for rate in args.rates],
    }


def _statistic(metric: Mapping[str, Any], statistic: str) -> float | None:
    values = metric.get("successful") or {}
    value = values.get(statistic) if statistic in ("mean", "median") else \
        (values.get("percentiles") or {}).get(statistic)
    return None if value is None else float(value)


def read_figures(report: Mapping[str, Any]) -> dict[float, dict[str, Any]]:
    """GuideLLM's JSON report -> per benchmark's target rate: each of :data:`FIGURES`
    (None where the report has no such figure, e.g. TTFT without streaming) and the
    request counts (``completed``, ``errored``). ValueError for a report without
    benchmarks or a benchmark without a rate."""
    if not isinstance(report, Mapping):
        raise ValueError("GuideLLM's report is not a JSON object")
    benchmarks = report.get("benchmarks") or []
    if not benchmarks:
        raise ValueError("GuideLLM's report has no benchmarks")
    out: dict[float, dict[str, Any]] = {}
    for bench in benchmarks:
        rate = (bench.get("config", {}).get("strategy") or {}).get("rate")
        if rate is None:
            raise ValueError("a benchmark of GuideLLM's report has no target rate")
        metrics = bench.get("metrics", {})
        row: dict[str, Any] = {}
        for label, name, statistic, scale in FIGURES:
            value = _statistic(metrics.get(name, {}), statistic)
            row[label] = None if value is None else value * scale
        totals = metrics.get("request_totals", {})
        row["completed"] = int(totals.get("successful", 0))
        row["errored"] = int(totals.get("errored", 0))
        out[float(rate)] = row
    return out


def run_guidellm(guidellm: Path, spec: dict[str, Any], workdir: Path, name: str,
                 quiet: bool, timeout_s: float) -> dict[float, dict[str, Any]]:
    """One ``guidellm run`` of ``spec`` (written to ``workdir/<name>.json``), its
    console shown unless ``quiet``, within ``timeout_s`` seconds
    (:func:`joulepool.toolenv.run_tool`); :func:`read_figures` of its report.
    RuntimeError when GuideLLM fails or runs out of time, or its report is missing or
    unreadable."""
    path = workdir / f"{name}.json"
    path.write_text(json.dumps(spec, indent=1))
    cmd = [str(guidellm), "run", "--scenario", str(path), "--disable-console-interactive"]
    if quiet:
        cmd.append("--disable-console")
    print(f"guidellm: {name}: {' '.join(cmd)}", flush=True)
    toolenv.run_tool(cmd, f"guidellm run ({name})", quiet, timeout_s)
    report = Path(spec["spec"]["outputs"][0]["path"])
    try:
        return read_figures(json.loads(report.read_text()))
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"guidellm run ({name}): report {report}: {exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    proxy_bench = _proxy_bench()
    load = os.getloadavg()[0]
    try:
        guidellm = ensure_guidellm(args.venv, args.python, [args.torch, args.guidellm])
    except SetupError as exc:
        print(f"bench guidellm: GuideLLM cannot be set up: {exc}", file=sys.stderr)
        return 2
    try:
        with tempfile.TemporaryDirectory(prefix="bench_guidellm_") as tmp:
            work = Path(tmp)
            try:
                build_tokenizer(args.venv, work / "tokenizer")
            except SetupError as exc:
                print(f"bench guidellm: GuideLLM cannot be set up: {exc}", file=sys.stderr)
                return 2

            def run_one(target: str, label: str) -> dict[float, dict[str, Any]]:
                spec = scenario(target, proxy_bench.MODEL, args, work / "tokenizer",
                                work / f"{label}-report.json")
                return run_guidellm(guidellm, spec, work, label, args.quiet,
                                    toolenv.run_timeout_s(len(args.rates), args.seconds))

            runs = proxy_bench.proxy_and_direct(args.engines, args.output_tokens, work,
                                                args.runs, "guidellm", run_one)
    except RuntimeError as exc:
        print(f"bench guidellm: {exc}", file=sys.stderr)
        return 1
    headline = (f"GuideLLM ({args.guidellm}) against the proxy and one engine directly: "
                f"{args.profile} rates {','.join(f'{r:g}' for r in args.rates)} req/s, "
                f"{args.seconds:g} s each, prompts {args.prompt_tokens} tokens, "
                f"{args.output_tokens} output tokens, "
                f"{'streaming' if args.stream else 'not streaming'}, {args.engines} instant "
                f"engine(s), medians of {args.runs} run(s); load average {load:.1f} at the "
                f"start")
    settings = {"guidellm": args.guidellm, "profile": args.profile, "rates": args.rates,
                "seconds": args.seconds, "runs": args.runs, "stream": args.stream,
                "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens}
    return int(proxy_bench.report_side_by_side(runs, LABELS, "guidellm", headline,
                                               settings, args.out, load))


if __name__ == "__main__":
    sys.exit(main())
