"""bench sim's side-by-side mode against another checkout's src (--baseline-src).

A smoke test of the harness (no timing asserted): both workers start, take turns and
report every policy; a folder with no joulepool package and two baselines at once
are refused with a message.
"""

from __future__ import annotations

import subprocess
import sys

from bench_helpers import BENCHMARKS

SCRIPT = str(BENCHMARKS / "bench_sim.py")
SRC = str(BENCHMARKS.parent / "src")


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          timeout=300, check=False)


def test_baseline_src_runs_both_sides_for_every_policy(tmp_path) -> None:
    done = _bench("--baseline-src", SRC, "--cluster", "freesh-3site", "--duration", "60",
                  "--policies", "round-robin,joulesched", "--runs", "1", "--check")
    out = done.stdout
    assert f"this checkout vs {SRC}" in out, done.stderr
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.split() and line.split()[0] in ("round-robin", "joulesched")}
    assert set(rows) == {"round-robin", "joulesched"}
    for cells in rows.values():  # this, baseline, ratio; per wall and per CPU second
        assert all(float(c.replace(",", "")) > 0 for c in cells[1:7])
    assert done.returncode in (0, 1)  # --check: 1 only when below target


def test_baseline_src_must_hold_the_package_and_excludes_against(tmp_path) -> None:
    missing = _bench("--baseline-src", str(tmp_path), "--runs", "1")
    assert missing.returncode != 0 and "no joulepool package there" in missing.stderr
    both = _bench("--baseline-src", SRC, "--against", "main")
    assert both.returncode == 2 and "not allowed with" in both.stderr
