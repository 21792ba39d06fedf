"""joulepool.toolenv: where a benchmark's external tool gets its interpreter and its
cached venv (bench guidellm, bench inference_perf), without installing anything."""

from __future__ import annotations

import stat
import sys
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
