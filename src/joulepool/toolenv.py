"""A cached virtual environment for an external tool a benchmark drives (a published
load generator such as GuideLLM or inference-perf), kept outside the project's own
environment and never in its test extra.

One environment per tool and pin, by default ``$XDG_CACHE_HOME`` (else ``~/.cache``)
``/joulepool/<tool>-<version>`` (:func:`default_venv`); created with ``python -m venv``
and ``pip install`` on first use and reused while the requirements and the Python
version it recorded match (:func:`ensure_venv`). :func:`find_python` picks the
interpreter when the tool needs a newer Python than the project's. Every refusal is a
:class:`SetupError` whose message says what to change; the benchmarks exit 2 with it.

No model hub is reachable from where the benchmarks run, so the tokenizer such a tool
needs to size its prompts is written locally (:func:`tokenizer_files`): a word-level
tokenizer over the words of the text the tool writes its prompts from, each word one
token.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

#: file in the venv recording the requirements and the Python version it was made with
MARKER = "joulepool-requirements.txt"
UNKNOWN_TOKEN = "[UNK]"
#: the most seconds ``python -m venv`` or ``pip install`` may take
INSTALL_TIMEOUT_S = 900.0
#: the most seconds a short setup step in the venv (a probe, a tokenizer check) may take
STEP_TIMEOUT_S = 300.0
#: what a tool run may take beyond its load stages: its start (imports, workers) once,
#: and each stage's own start and drain
RUN_MARGIN_S = 120.0
STAGE_MARGIN_S = 30.0
#: set for every tool process: nothing may be fetched from a model hub
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


class SetupError(Exception):
    """The tool cannot be set up here (the benchmark exits 2 with this message)."""


def tail(text: str, lines: int = 15) -> str:
    """The last ``lines`` lines of ``text`` (for a failed command's output)."""
    return "\n".join(text.strip().splitlines()[-lines:])


def setup_step(cmd: Sequence[str], what: str, timeout_s: float = STEP_TIMEOUT_S,
               env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``cmd`` run to its end with its output captured (text), within ``timeout_s``
    seconds; SetupError naming ``what`` when it cannot start or runs out of time (a
    non-zero exit is the caller's to judge)."""
    try:
        return subprocess.run(list(cmd), capture_output=True, text=True, check=False,
                              timeout=timeout_s, env=None if env is None else dict(env))
    except subprocess.TimeoutExpired:
        raise SetupError(f"{what} took more than {timeout_s:.0f} s: {cmd[0]} stopped") \
            from None
    except OSError as exc:
        raise SetupError(f"{what}: cannot run {cmd[0]}: {exc}") from None


def run_timeout_s(stages: int, seconds: float) -> float:
    """The most seconds a tool run of ``stages`` load stages of ``seconds`` each may take:
    ``stages * (seconds + STAGE_MARGIN_S) + RUN_MARGIN_S``."""
    return stages * (seconds + STAGE_MARGIN_S) + RUN_MARGIN_S


def run_tool(cmd: Sequence[str], name: str, quiet: bool, timeout_s: float) -> None:
    """Run the tool command ``cmd`` to its end in a session of its own, with
    :data:`OFFLINE_ENV` and unbuffered Python output; its console shown unless
    ``quiet`` (then captured, its tail given when it fails). RuntimeError naming
    ``name`` when it cannot start, exits non-zero or runs past ``timeout_s`` seconds
    (then its whole process group, its worker processes too, is killed first)."""
    env = {**os.environ, **OFFLINE_ENV, "PYTHONUNBUFFERED": "1"}
    pipe = subprocess.PIPE if quiet else None
    try:
        proc = subprocess.Popen(list(cmd), env=env, text=True, stdout=pipe, stderr=pipe,
                                start_new_session=True)
    except OSError as exc:
        raise RuntimeError(f"{name}: cannot run {cmd[0]}: {exc}") from None
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise RuntimeError(f"{name} ran past {timeout_s:.0f} s: stopped, its processes "
                           f"killed") from None
    except BaseException:
        _kill_group(proc)
        raise
    if proc.returncode != 0:
        detail = f":\n{tail((out or '') + (err or ''))}" if quiet else ""
        raise RuntimeError(f"{name} failed with exit {proc.returncode}{detail}")


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """SIGKILL ``proc``'s process group (it leads one: ``start_new_session``) and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


def _dotted(version: tuple[int, int]) -> str:
    return ".".join(map(str, version))


def default_venv(tool: str, requirement: str) -> Path:
    """``$XDG_CACHE_HOME`` (else ``~/.cache``) ``/joulepool/<tool>-<version>``, the
    version from ``requirement``'s ``==`` pin, else ``latest``. SetupError for a pinned
    version that is not ``[\\w.+!-]+`` (it could lead out of the cache, e.g. ``../x``)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    _, pinned, version = requirement.rpartition("==")
    version = version.strip() if pinned and version.strip() else "latest"
    if not re.fullmatch(r"[\w.+!-]+", version):
        raise SetupError(f"{requirement!r}: the pinned version {version!r} is not letters, "
                         f"digits and . + ! - _ (it names the venv's folder)")
    return cache / "joulepool" / f"{tool}-{version}"


def python_version(python: str, minimum: tuple[int, int], tool: str) -> tuple[int, int]:
    """``python``'s (major, minor); SetupError when it does not run or is older than
    ``minimum`` (the message names ``tool`` and ``--python``)."""
    try:
        probe = subprocess.run([python, "-c", "import sys; print(*sys.version_info[:2])"],
                               capture_output=True, text=True, check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SetupError(f"cannot run {python}: {exc}") from None
    if probe.returncode != 0:
        raise SetupError(f"cannot run {python}: {tail(probe.stderr, 3)}")
    try:
        major, minor = (int(x) for x in probe.stdout.split())
    except ValueError:
        raise SetupError(f"cannot read {python}'s version from {probe.stdout!r}") from None
    if (major, minor) < minimum:
        raise SetupError(f"{python} is Python {major}.{minor}; {tool} needs >= "
                         f"{_dotted(minimum)} (--python)")
    return major, minor


def python_candidates(minimum: tuple[int, int], pyenv_root: Path | None = None,
                      newest_minor: int = 20) -> list[str]:
    """Where :func:`find_python` looks, in order: this interpreter; ``python3.N`` on
    ``PATH`` for N from ``newest_minor`` down to ``minimum``'s minor; pyenv's
    interpreters (``<pyenv_root>/versions/X.Y.Z/bin/python``, ``pyenv_root`` by default
    ``$PYENV_ROOT`` else ``~/.pyenv``), newest first, those of ``minimum`` or later."""
    found = [sys.executable]
    for minor in range(newest_minor, minimum[1] - 1, -1):
        path = shutil.which(f"python{minimum[0]}.{minor}")
        if path:
            found.append(path)
    root = pyenv_root or Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    versions: list[tuple[tuple[int, ...], str]] = []
    for entry in (root / "versions").glob("*/bin/python"):
        match = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", entry.parent.parent.name)
        if match and tuple(map(int, match.groups()[:2])) >= minimum:
            versions.append((tuple(map(int, match.groups())), str(entry)))
    found += [path for _, path in sorted(versions, reverse=True)]
    return list(dict.fromkeys(found))


def find_python(minimum: tuple[int, int], tool: str, given: str | None = None,
                candidates: Iterable[str] | None = None) -> str:
    """``given`` if set (SetupError unless it is Python >= ``minimum``), else the first
    of ``candidates`` (default :func:`python_candidates`) that runs and is recent
    enough; SetupError naming every place looked at when none is."""
    if given:
        python_version(given, minimum, tool)
        return given
    looked = list(candidates if candidates is not None else python_candidates(minimum))
    for python in looked:
        try:
            python_version(python, minimum, tool)
        except SetupError:
            continue
        return python
    pyenv = os.environ.get("PYENV_ROOT") or "~/.pyenv"
    raise SetupError(f"{tool} needs Python >= {_dotted(minimum)} and none was found: "
                     f"looked at {', '.join(looked) or 'nothing'} (this interpreter, "
                     f"python{minimum[0]}.N on PATH, {pyenv}/versions/*); give one with "
                     f"--python")


def ensure_venv(venv: Path, python: str, requirements: Sequence[str], executable: str,
                tool: str, minimum: tuple[int, int], size_note: str = "") -> Path:
    """The ``executable`` of ``venv`` (``bin/<executable>``), made with ``python -m
    venv`` and ``pip install *requirements`` unless the venv records exactly these
    requirements and ``python``'s version (:data:`MARKER`) and its own ``bin/python``
    runs. Only a venv this function made (it carries :data:`MARKER`) is ever rebuilt: a
    folder there that is not empty and has no marker (another venv, the project's own,
    anything else) is refused and left as it is. Progress on stdout (``size_note``: what
    the install weighs, said before it starts); SetupError when it cannot be set up
    (each command within :data:`INSTALL_TIMEOUT_S`)."""
    major, minor = python_version(python, minimum, tool)
    marker = venv / MARKER
    wanted = "\n".join([*requirements, f"python {major}.{minor}"]) + "\n"
    program = venv / "bin" / executable
    if marker.is_file():
        if marker.read_text() == wanted and program.exists() and _runs(venv):
            print(f"{tool}: reusing {venv} ({', '.join(requirements)})", flush=True)
            return program
    elif venv.exists() and (not venv.is_dir() or any(venv.iterdir())):
        raise SetupError(f"{venv} exists and is not a virtual environment joulepool made "
                         f"(no {MARKER} in it), so it is left alone: give --venv a new or "
                         f"empty folder, or remove {venv} yourself")
    note = f" ({size_note})" if size_note else ""
    print(f"{tool}: creating {venv} with Python {major}.{minor}: pip install "
          f"{' '.join(requirements)}{note}", flush=True)
    t0 = time.monotonic()
    made = setup_step([python, "-m", "venv", "--clear", str(venv)],
                      f"python -m venv {venv}", INSTALL_TIMEOUT_S)
    if made.returncode != 0:
        raise SetupError(f"python -m venv {venv} failed:\n{tail(made.stderr)}")
    marker.write_text("incomplete\n")  # ours from now on: a failed install is rebuilt
    pip = setup_step([str(venv / "bin" / "python"), "-m", "pip", "install",
                      "--disable-pip-version-check", "-q", *requirements],
                     f"pip install {' '.join(requirements)}", INSTALL_TIMEOUT_S)
    if pip.returncode != 0 or not program.exists():
        raise SetupError(f"pip install {' '.join(requirements)} into {venv} failed "
                         f"(exit {pip.returncode}):\n{tail(pip.stdout + pip.stderr)}")
    marker.write_text(wanted)
    print(f"{tool}: installed in {time.monotonic() - t0:.0f} s", flush=True)
    return program


def recorded_python(venv: Path) -> str:
    """The Python version (``X.Y``) :func:`ensure_venv` recorded in ``venv``'s
    :data:`MARKER` when it made it; ``unknown`` when there is no such record."""
    try:
        lines = (venv / MARKER).read_text().splitlines()
    except OSError:
        return "unknown"
    versions = [line.removeprefix("python ") for line in lines if line.startswith("python ")]
    return versions[-1] if versions else "unknown"


def _runs(venv: Path) -> bool:
    """Whether ``venv``'s own ``bin/python`` starts (it does not when the interpreter it
    was made from is gone)."""
    try:
        probe = subprocess.run([str(venv / "bin" / "python"), "-c", "pass"],
                               capture_output=True, check=False, timeout=STEP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def tokenizer_files(words: Iterable[str]) -> dict[str, str]:
    """A word-level Hugging Face tokenizer over ``words`` (case-folded, each once) and
    ``.``: file name -> content, ``tokenizer.json`` (the ``tokenizers`` library's
    format: lower-casing, split on whitespace and punctuation, the unknown token
    ``[UNK]`` id 0, then ``.``, then the words in sorted order) and
    ``tokenizer_config.json`` (``transformers``' fast tokenizer class). Decoding joins
    tokens with spaces. ValueError for an empty word list or a word the pre-tokenizer
    would split (not all word characters)."""
    vocab: dict[str, int] = {UNKNOWN_TOKEN: 0, ".": 1}
    folded = sorted({w.lower() for w in words})
    for word in folded:
        if not re.fullmatch(r"\w+", word):
            raise ValueError(f"not a single word: {word!r}")
        vocab[word] = len(vocab)
    if not folded:
        raise ValueError("no words for the tokenizer")
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": 0, "content": UNKNOWN_TOKEN, "single_word": False,
                          "lstrip": False, "rstrip": False, "normalized": False,
                          "special": True}],
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": UNKNOWN_TOKEN},
    }
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": UNKNOWN_TOKEN,
              "model_max_length": 1_000_000, "clean_up_tokenization_spaces": False}
    return {"tokenizer.json": json.dumps(tokenizer),
            "tokenizer_config.json": json.dumps(config, indent=1)}
