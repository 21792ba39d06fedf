"""The routing proxy under inference-perf, offline: proxy vs direct.

The second published load generator after ``bench guidellm``: inference-perf, the
Kubernetes serving working group's benchmarking tool (kubernetes-sigs/inference-perf),
drives the proxy and, the same way, one engine directly, and its own figures are
printed side by side with the ratio proxy / direct: achieved requests per second, TTFT,
inter-token latency (ITL), time per output token (TPOT) and request latency, median
and p99.

What it runs (loopback only): ``bench proxy``'s instant engines and router, started
with its functions (``start_engines``, ``write_endpoints``, ``start_router``), as
``bench guidellm`` does; then one ``inference-perf --config_file`` per target and run
(the targets' order alternating between runs), each a ``--profile`` (constant or
poisson) load with one stage per rate of ``--rates`` (requests/s, ``--seconds`` each,
one second apart), synthetic prompts of exactly ``--prompt-tokens`` tokens asking for
``--output-tokens`` (``ignore_eos``), streaming unless ``--no-stream``, from
``--workers`` worker processes. inference-perf's console output is shown as it runs
(``--quiet``: not); its per-stage JSON reports are read (``--reports DIR`` keeps them).

Setup, outside the project's environment (never in its test extra): inference-perf
0.7.0 needs Python >= 3.12 (the project runs on 3.11), found by
:func:`joulepool.toolenv.find_python` (``--python``, else this interpreter, else
``python3.N`` on PATH, else pyenv's versions); its venv, by default
``~/.cache/joulepool/inference-perf-<version>`` (``--venv``), is made on first use with
``pip install inference-perf==0.7.0`` (no torch: transformers, datasets, pandas,
pyarrow, boto3, google-cloud-storage; about 800 MB, 70 s to install here) and reused while
its recorded requirements and Python version match (:mod:`joulepool.toolenv`, shared
with ``bench guidellm``). No model hub is reachable, so the tokenizer inference-perf
counts and cuts its prompts with is made locally: the words of the Shakespeare text
inference-perf ships as its synthetic corpus (lower-case ASCII words, the first
``CORPUS_WORDS``) are written as the corpus it reads, and a word-level tokenizer over
them (:func:`joulepool.toolenv.tokenizer_files`), so that each word is one token and a
prompt cut to N tokens is N words (checked in the venv before the load starts).
``HF_HUB_OFFLINE=1`` keeps it from fetching anything. Exit 2 with the reason when it
cannot be set up or an argument is bad; 1 when a run fails or a request errs.

    joulepool bench inference_perf [--rates 5,20] [--seconds 10] [--runs 1]
        [--engines 2] [--prompt-tokens 128] [--output-tokens 32] [--profile constant]
        [--workers 1] [--no-stream] [--venv DIR] [--python PATH] [--quiet]
        [--reports DIR] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from joulepool import toolenv
from joulepool.bench import load_benchmark
from joulepool.toolenv import SetupError, tail, tokenizer_files

#: ``joulepool bench all`` skips this benchmark (it installs inference-perf's venv on
#: first use, and needs Python >= 3.12): run it by name.
IN_ALL = False
INFERENCE_PERF_REQUIREMENT = "inference-perf==0.7.0"
MIN_PYTHON = (3, 12)  # inference-perf 0.7's floor
TOOL = "inference-perf"
#: words of inference-perf's corpus kept (its prompts are slices of it; 50,000 words are
#: some 390 prompts of 128 tokens without overlap, and a tokenizer of some 6,000 words)
CORPUS_WORDS = 50_000

#: inference-perf's figures reported here: (label, path in a stage's
#: ``stage_N_lifecycle_metrics.json`` under ``successes``, scale to the label's unit).
#: Requests per second: the achieved throughput of successful requests.
FIGURES: tuple[tuple[str, tuple[str, ...], float], ...] = (
    ("req/s", ("throughput", "requests_per_sec"), 1.0),
    ("TTFT p50 ms", ("latency", "time_to_first_token", "median"), 1e3),
    ("TTFT p99 ms", ("latency", "time_to_first_token", "p99"), 1e3),
    ("ITL p50 ms", ("latency", "inter_token_latency", "median"), 1e3),
    ("ITL p99 ms", ("latency", "inter_token_latency", "p99"), 1e3),
    ("TPOT p50 ms", ("latency", "time_per_output_token", "median"), 1e3),
    ("latency p50 ms", ("latency", "request_latency", "median"), 1e3),
    ("latency p99 ms", ("latency", "request_latency", "p99"), 1e3),
)
LABELS = tuple(label for label, *_ in FIGURES)
_STAGE_REPORT = re.compile(r"stage_(\d+)_lifecycle_metrics\.json")


# --------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (module docstring); argparse exits 2 on a bad argument."""
    shared = load_benchmark("proxy")
    positive_int = shared.positive_int
    ap = argparse.ArgumentParser(prog="bench_inference_perf",
                                 description=(__doc__ or "").split("\n\n")[0])
    shared.load_generator_arguments(ap, TOOL, "inference-perf stage")
    ap.add_argument("--seconds", type=positive_int, default=10,
                    help="duration of each stage, whole seconds (inference-perf's unit)")
    ap.add_argument("--workers", type=positive_int, default=1,
                    help="inference-perf's worker processes (default 1)")
    ap.add_argument("--venv", type=Path, default=None,
                    help="inference-perf's virtual environment (default: under "
                         "~/.cache/joulepool)")
    ap.add_argument("--python", default=None,
                    help="interpreter that creates the venv (>= 3.12; default: found)")
    ap.add_argument("--inference-perf", dest="requirement",
                    default=INFERENCE_PERF_REQUIREMENT,
                    help=f"pip requirement (default {INFERENCE_PERF_REQUIREMENT})")
    ap.add_argument("--reports", type=Path, default=None,
                    help="keep inference-perf's report folders here (one per run)")
    args = ap.parse_args(argv)
    if args.venv is None:
        try:
            args.venv = toolenv.default_venv(TOOL, args.requirement)
        except SetupError as exc:
            ap.error(str(exc))
    return args


# --------------------------------------------------------------------------
# Corpus and tokenizer
# --------------------------------------------------------------------------
def corpus_words(text: str, limit: int = CORPUS_WORDS) -> list[str]:
    """The first ``limit`` lower-case ASCII words of ``text`` (its letters only:
    punctuation, digits and apostrophes split words and are dropped)."""
    return re.findall(r"[a-z]+", text.lower())[:limit]


def corpus_text(words: Sequence[str], per_line: int = 16) -> str:
    """``words`` joined by spaces, ``per_line`` to a line, ending in a newline."""
    lines = (" ".join(words[i:i + per_line]) for i in range(0, len(words), per_line))
    return "\n".join(lines) + "\n"


_BUNDLED_CORPUS = ("import inference_perf, pathlib; print(pathlib.Path("
                   "inference_perf.__file__).parent / 'assets' / 'shakespeare.txt')")
_CHECK_TOKENIZER = """
import sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
ids = tok.encode(open(sys.argv[2]).read())
n = int(sys.argv[3])
cut = tok.decode(ids[n:2 * n])
print(len(tok), len(ids), ids.count(tok.unk_token_id), len(tok.encode(cut)))
"""


def build_corpus_and_tokenizer(venv: Path, directory: Path, prompt_tokens: int
                               ) -> tuple[Path, Path]:
    """Write the corpus (:func:`corpus_words` of inference-perf's bundled Shakespeare,
    found in ``venv``) and the word-level tokenizer over it into ``directory``; check
    in the venv that transformers loads it, that the corpus has no unknown token and
    that ``prompt_tokens`` tokens decoded and encoded again are ``prompt_tokens``
    tokens (inference-perf cuts prompts so). (corpus file, tokenizer folder);
    SetupError when a step fails."""
    python = str(venv / "bin" / "python")
    found = toolenv.setup_step([python, "-c", _BUNDLED_CORPUS],
                               "finding inference-perf's corpus")
    if found.returncode != 0:
        raise SetupError(f"cannot find inference-perf's corpus in {venv}:\n"
                         f"{tail(found.stderr)}")
    try:
        words = corpus_words(Path(found.stdout.strip()).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SetupError(f"cannot read inference-perf's corpus in {venv}: {exc}") from None
    if len(words) < 2 * prompt_tokens:
        raise SetupError(f"inference-perf's corpus has {len(words)} words, fewer than "
                         f"twice --prompt-tokens ({prompt_tokens})")
    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / "corpus.txt"
    corpus.write_text(corpus_text(words))
    tokenizer = directory / "tokenizer"
    tokenizer.mkdir(exist_ok=True)
    for name, content in tokenizer_files(words).items():
        (tokenizer / name).write_text(content)
    check = toolenv.setup_step([python, "-c", _CHECK_TOKENIZER, str(tokenizer), str(corpus),
                                str(prompt_tokens)], "checking the local tokenizer",
                               env={**os.environ, **toolenv.OFFLINE_ENV})
    if check.returncode != 0:
        raise SetupError(f"transformers cannot load the local tokenizer {tokenizer}:\n"
                         f"{tail(check.stderr)}")
    try:
        size, tokens, unknown, cut = (int(x) for x in check.stdout.split()[-4:])
    except ValueError:
        raise SetupError(f"the tokenizer check printed {check.stdout!r}, not four "
                         f"counts") from None
    if unknown or cut != prompt_tokens:
        raise SetupError(f"the local tokenizer leaves {unknown} of {tokens} corpus tokens "
                         f"unknown, or a {prompt_tokens}-token cut encodes to {cut}")
    print(f"{TOOL}: local word-level tokenizer, {size} tokens, over {len(words)} corpus "
          f"words in {directory} (none unknown)", flush=True)
    return corpus, tokenizer


# --------------------------------------------------------------------------
# Runs and figures
# --------------------------------------------------------------------------
def config(target: str, model: str, args: argparse.Namespace, corpus: Path,
           tokenizer: Path, reports: Path) -> dict[str, Any]:
    """inference-perf's configuration (its ``--config_file``, YAML, of which JSON is a
    subset): the completions API at ``http://<target>`` as a vLLM server serving
    ``model``, streaming unless ``args.stream`` is off; synthetic prompts of exactly
    ``args.prompt_tokens`` tokens cut from ``corpus`` asking for
    ``args.output_tokens`` (fixed distributions); the local ``tokenizer``; one load
    stage per rate of ``args.rates`` for ``args.seconds``; ``args.workers`` workers;
    the summary and per-stage reports (no Prometheus, no per-request report) in
    ``reports``."""
    def fixed(n: int) -> dict[str, Any]:
        return {"type": "fixed", "min": n, "max": n, "mean": n, "std_dev": 0}

    return {
        "api": {"type": "completion", "streaming": bool(args.stream)},
        "server": {"type": "vllm", "model_name": model, "base_url": f"http://{target}",
                   "ignore_eos": True},
        "tokenizer": {"pretrained_model_name_or_path": str(tokenizer)},
        "data": {"type": "synthetic", "corpus_file_path": str(corpus),
                 "input_distribution": fixed(args.prompt_tokens),
                 "output_distribution": fixed(args.output_tokens)},
        "load": {"type": args.profile, "num_workers": args.workers,
                 "stages": [{"rate": rate, "duration": args.seconds}
                            for rate in args.rates]},
        "report": {"request_lifecycle": {"summary": True, "per_stage": True,
                                         "per_request": False},
                   "prometheus": None},
        "storage": {"local_storage": {"path": str(reports)}},
    }


def _dig(tree: Mapping[str, Any], path: Sequence[str]) -> float | None:
    node: Any = tree
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return None if node is None else float(node)


def read_stage(report: Mapping[str, Any]) -> tuple[float, dict[str, Any]]:
    """One ``stage_N_lifecycle_metrics.json`` -> (its requested rate, each of
    :data:`FIGURES`, None where the report has none, e.g. TTFT without streaming, and
    the request counts ``completed``, ``errored``). ValueError for a report without a
    requested rate."""
    rate = _dig(report, ("load_summary", "requested_rate"))
    if rate is None:
        raise ValueError("an inference-perf stage report has no load_summary.requested_rate")
    successes = report.get("successes") or {}
    row: dict[str, Any] = {}
    for label, path, scale in FIGURES:
        value = _dig(successes, path)
        row[label] = None if value is None else value * scale
    row["completed"] = int(successes.get("count") or 0)
    row["errored"] = int((report.get("failures") or {}).get("count") or 0)
    return rate, row


def read_reports(folder: Path) -> dict[float, dict[str, Any]]:
    """Every stage report in ``folder`` (inference-perf's report folder), by requested
    rate (:func:`read_stage`). ValueError when there is none."""
    stages = sorted((int(m.group(1)), p) for p in folder.iterdir()
                    if (m := _STAGE_REPORT.fullmatch(p.name)))
    if not stages:
        raise ValueError(f"no stage_N_lifecycle_metrics.json in {folder}")
    return dict(read_stage(json.loads(path.read_text())) for _, path in stages)


def run_inference_perf(program: Path, cfg: dict[str, Any], workdir: Path, name: str,
                       quiet: bool, timeout_s: float) -> dict[float, dict[str, Any]]:
    """One ``inference-perf --config_file`` run of ``cfg`` (written to
    ``workdir/<name>.yaml``), its console shown unless ``quiet``, within ``timeout_s``
    seconds (:func:`joulepool.toolenv.run_tool`); :func:`read_reports` of its report
    folder. RuntimeError when it fails, runs out of time or writes no stage report."""
    path = workdir / f"{name}.yaml"
    path.write_text(json.dumps(cfg, indent=1))
    cmd = [str(program), "--config_file", str(path), "--log-level",
           "WARNING" if quiet else "INFO"]
    print(f"{TOOL}: {name}: {' '.join(cmd)}", flush=True)
    toolenv.run_tool(cmd, f"inference-perf ({name})", quiet, timeout_s)
    try:
        return read_reports(Path(cfg["storage"]["local_storage"]["path"]))
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"inference-perf ({name}): {exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    proxy_bench = load_benchmark("proxy")
    load = os.getloadavg()[0]
    try:
        python = toolenv.find_python(MIN_PYTHON, TOOL, args.python)
        program = toolenv.ensure_venv(args.venv, python, [args.requirement], TOOL, TOOL,
                                      MIN_PYTHON, "about 800 MB: transformers, datasets, "
                                      "pandas, pyarrow, no torch; a minute or two")
    except SetupError as exc:
        print(f"bench inference_perf: {TOOL} cannot be set up: {exc}", file=sys.stderr)
        return 2
    try:
        with tempfile.TemporaryDirectory(prefix="bench_inference_perf_") as tmp:
            work = Path(tmp)
            try:
                corpus, tokenizer = build_corpus_and_tokenizer(args.venv, work,
                                                               args.prompt_tokens)
            except SetupError as exc:
                print(f"bench inference_perf: {TOOL} cannot be set up: {exc}",
                      file=sys.stderr)
                return 2

            def run_one(target: str, label: str) -> dict[float, dict[str, Any]]:
                reports = work / f"{label}-reports"
                cfg = config(target, proxy_bench.MODEL, args, corpus, tokenizer, reports)
                figures = run_inference_perf(program, cfg, work, label, args.quiet,
                                             toolenv.run_timeout_s(len(args.rates),
                                                                   args.seconds + 1))
                if args.reports:  # this run's reports only, none of an earlier run's
                    shutil.rmtree(args.reports / label, ignore_errors=True)
                    shutil.copytree(reports, args.reports / label)
                return figures

            runs = proxy_bench.proxy_and_direct(args.engines, args.output_tokens, work,
                                                args.runs, TOOL, run_one)
    except RuntimeError as exc:
        print(f"bench inference_perf: {exc}", file=sys.stderr)
        return 1
    version = toolenv.recorded_python(args.venv)
    headline = (f"inference-perf ({args.requirement}, Python {version}) against the proxy "
                f"and one engine directly: {args.profile} rates "
                f"{','.join(f'{r:g}' for r in args.rates)} req/s, {args.seconds} s each, "
                f"prompts {args.prompt_tokens} tokens, {args.output_tokens} output tokens, "
                f"{'streaming' if args.stream else 'not streaming'}, {args.workers} "
                f"worker(s), {args.engines} instant engine(s), medians of {args.runs} "
                f"run(s); load average {load:.1f} at the start")
    settings = {"inference_perf": args.requirement, "profile": args.profile,
                "rates": args.rates, "seconds": args.seconds, "runs": args.runs,
                "stream": args.stream, "workers": args.workers,
                "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens}
    return int(proxy_bench.report_side_by_side(runs, LABELS, "inference_perf", headline, settings,
                                               args.out, load))


if __name__ == "__main__":
    sys.exit(main())
