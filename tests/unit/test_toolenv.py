"""joulepool.toolenv: where a benchmark's external tool gets its interpreter and its
cached venv (bench guidellm, bench inference_perf), without installing anything."""

from __future__ import annotations

import stat
import sys
import time
from pathlib import Path

import pytest

from joulepool import toolenv


def _fake_python(path: Path, version: str, ok: bool = True) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho {version}\n" if ok else "#!/bin/sh\nexit 3\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_default_venv_is_one_per_tool_and_pin(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert toolenv.default_venv("inference-perf", "inference-perf==0.7.0") == \
        tmp_path / "joulepool" / "inference-perf-0.7.0"
    assert toolenv.default_venv("inference-perf", "inference-perf") == \
        tmp_path / "joulepool" / "inference-perf-latest"


def test_the_first_candidate_recent_enough_is_found(tmp_path) -> None:
    broken = _fake_python(tmp_path / "broken", "", ok=False)
    old = _fake_python(tmp_path / "old", "3 11")
    new = _fake_python(tmp_path / "new", "3 12")
    newer = _fake_python(tmp_path / "newer", "3 13")
    assert toolenv.find_python((3, 12), "tool", candidates=[broken, old, new, newer]) == new


def test_none_recent_enough_names_every_place_looked(tmp_path) -> None:
    old = _fake_python(tmp_path / "old", "3 11")
    missing = str(tmp_path / "missing")
    with pytest.raises(toolenv.SetupError) as exc:
        toolenv.find_python((3, 12), "inference-perf", candidates=[old, missing])
    message = str(exc.value)
    assert "inference-perf needs Python >= 3.12" in message
    assert old in message and missing in message and "--python" in message


def test_a_given_interpreter_is_checked_not_replaced(tmp_path) -> None:
    old = _fake_python(tmp_path / "old", "3 11")
    new = _fake_python(tmp_path / "new", "3 12")
    with pytest.raises(toolenv.SetupError, match=r"is Python 3\.11; tool needs >= 3\.12"):
        toolenv.find_python((3, 12), "tool", given=old, candidates=[new])
    assert toolenv.find_python((3, 12), "tool", given=new, candidates=[]) == new


def test_candidates_are_this_interpreter_path_then_pyenv_newest_first(monkeypatch,
                                                                      tmp_path) -> None:
    bin_dir = tmp_path / "bin"
    on_path = _fake_python(bin_dir / "python3.12", "3 12")
    _fake_python(bin_dir / "python3.11", "3 11")  # older than asked: not looked for
    root = tmp_path / "pyenv"
    for version in ("3.11.7", "3.12.1", "3.13.0", "3.13.0a1"):
        _fake_python(root / "versions" / version / "bin" / "python", "3 0")
    monkeypatch.setenv("PATH", str(bin_dir))
    found = toolenv.python_candidates((3, 12), pyenv_root=root)
    assert found == [sys.executable, on_path,
                     str(root / "versions" / "3.13.0" / "bin" / "python"),
                     str(root / "versions" / "3.12.1" / "bin" / "python")]


def test_no_pyenv_and_nothing_on_path_leaves_this_interpreter(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert toolenv.python_candidates((3, 12), pyenv_root=tmp_path / "none") == \
        [sys.executable]


def test_a_pinned_version_that_is_not_a_plain_name_is_refused(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    for requirement in ("guidellm==../../x", "guidellm==1/2", "guidellm==1 ; os"):
        with pytest.raises(toolenv.SetupError, match="is not letters"):
            toolenv.default_venv("guidellm", requirement)
    assert toolenv.default_venv("torch", "torch==2.13.0+cpu") == \
        tmp_path / "joulepool" / "torch-2.13.0+cpu"


def _record_commands(monkeypatch) -> list[list[str]]:
    """Stand-ins for ``python -m venv`` and pip: each call recorded; the venv's folder,
    its ``bin/python`` (a copy of nothing: a script that exits 0) and ``bin/tool``
    written as they would be."""
    calls: list[list[str]] = []
    real_run = toolenv.subprocess.run

    def fake_run(cmd, *args, **kwargs):
        cmd = [str(c) for c in cmd]
        if cmd[1:3] == ["-m", "venv"] or cmd[1:4] == ["-m", "pip", "install"]:
            calls.append(cmd)
            if cmd[1:3] == ["-m", "venv"]:
                venv = Path(cmd[-1])
                if venv.exists():
                    for entry in venv.iterdir():  # --clear
                        entry.unlink() if entry.is_file() else None
                _fake_python(venv / "bin" / "python", "")
            else:
                _fake_python(Path(cmd[0]).parent / "tool", "")
            return toolenv.subprocess.CompletedProcess(cmd, 0, "", "")
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(toolenv.subprocess, "run", fake_run)
    return calls


@pytest.mark.parametrize("with_cfg", [True, False])
def test_a_venv_not_made_here_is_refused_and_left_untouched(monkeypatch, tmp_path,
                                                             with_cfg: bool) -> None:
    calls = _record_commands(monkeypatch)
    venv = tmp_path / ".venv"
    _fake_python(venv / "bin" / "python", "")
    if with_cfg:
        (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    before = sorted(p.relative_to(venv) for p in venv.rglob("*"))
    with pytest.raises(toolenv.SetupError) as exc:
        toolenv.ensure_venv(venv, sys.executable, ["tool==1"], "tool", "tool", (3, 0))
    assert "not a virtual environment joulepool made" in str(exc.value)
    assert toolenv.MARKER in str(exc.value) and "--venv" in str(exc.value)
    assert calls == []
    assert sorted(p.relative_to(venv) for p in venv.rglob("*")) == before


def test_our_venv_with_other_requirements_is_rebuilt_and_the_same_reused(monkeypatch,
                                                                         tmp_path, capsys
                                                                         ) -> None:
    calls = _record_commands(monkeypatch)
    venv = tmp_path / "venv"
    _fake_python(venv / "bin" / "python", "")
    _fake_python(venv / "bin" / "tool", "")
    (venv / toolenv.MARKER).write_text("tool==0\npython 3.0\n")
    program = toolenv.ensure_venv(venv, sys.executable, ["tool==1"], "tool", "tool", (3, 0))
    assert program == venv / "bin" / "tool"
    assert [c[1:3] for c in calls] == [["-m", "venv"], ["-m", "pip"]]
    assert "--clear" in calls[0] and calls[1][-1] == "tool==1"
    major, minor = sys.version_info[:2]
    assert (venv / toolenv.MARKER).read_text() == f"tool==1\npython {major}.{minor}\n"
    calls.clear()
    capsys.readouterr()
    assert toolenv.ensure_venv(venv, sys.executable, ["tool==1"], "tool", "tool",
                               (3, 0)) == program
    assert calls == [] and "reusing" in capsys.readouterr().out
    assert toolenv.recorded_python(venv) == f"{major}.{minor}"
    assert toolenv.recorded_python(tmp_path / "none") == "unknown"


def test_our_venv_whose_python_no_longer_runs_is_rebuilt(monkeypatch, tmp_path) -> None:
    calls = _record_commands(monkeypatch)
    venv = tmp_path / "venv"
    _fake_python(venv / "bin" / "python", "", ok=False)  # its base interpreter is gone
    _fake_python(venv / "bin" / "tool", "")
    major, minor = sys.version_info[:2]
    (venv / toolenv.MARKER).write_text(f"tool==1\npython {major}.{minor}\n")
    toolenv.ensure_venv(venv, sys.executable, ["tool==1"], "tool", "tool", (3, 0))
    assert [c[1:3] for c in calls] == [["-m", "venv"], ["-m", "pip"]]


def test_a_tool_run_past_its_time_is_stopped_with_its_workers(tmp_path) -> None:
    pid_file = tmp_path / "worker.pid"
    script = f"sleep 600 & echo $! > {pid_file}; wait"
    with pytest.raises(RuntimeError, match=r"tool \(x\) ran past 1 s"):
        toolenv.run_tool(["sh", "-c", script], "tool (x)", quiet=True, timeout_s=1)
    worker = int(pid_file.read_text())
    for _ in range(100):  # SIGKILL was sent; the kernel may take a moment to end it
        try:
            state = Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            state = "gone"
        if state in ("gone", "Z"):  # killed (a zombie until init reaps it)
            break
        time.sleep(0.05)
    assert state in ("gone", "Z")


def test_a_failing_tool_run_gives_its_exit_and_output_tail() -> None:
    with pytest.raises(RuntimeError, match=r"(?s)tool failed with exit 3:\nboom"):
        toolenv.run_tool(["sh", "-c", "echo boom; exit 3"], "tool", quiet=True, timeout_s=60)
    toolenv.run_tool(["sh", "-c", "exit 0"], "tool", quiet=True, timeout_s=60)


def test_a_setup_step_past_its_time_or_missing_is_a_setup_error(tmp_path) -> None:
    with pytest.raises(toolenv.SetupError, match="probe took more than 0 s"):
        toolenv.setup_step(["sleep", "5"], "probe", timeout_s=0.2)
    with pytest.raises(toolenv.SetupError, match="probe: cannot run"):
        toolenv.setup_step([str(tmp_path / "missing")], "probe")
