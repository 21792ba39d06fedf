"""Kubernetes resource quantities: one parser (api/quantity.py) for extender, router and
operator; bad or absurd input is a ValueError naming it, never an overflow or a hang."""

from __future__ import annotations

import ast
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from joulepool.api.quantity import node_resource_count, parse_quantity, quantity_to_int

SRC = Path(__file__).resolve().parents[2] / "src" / "joulepool"

#: each of these crashed or hung some parser before: float('1e999') is inf (int(inf):
#: OverflowError), Decimal('1e999999') expands into a million digits
ABSURD = ["1e999", "1E999", "1e999999", "-1e999", "1e31", "1e30Ei", "9" * 64,
          "99999999999999999999Ei", "1e99999999999999999999", "inf", "NaN", "1" + "0" * 5000]


@pytest.mark.parametrize(
    ("text", "value"),
    [("8", 8), ("500m", Decimal("0.5")), ("1Gi", 2**30), ("2k", 2000), ("1e3", 1000),
     ("1E", Decimal("1e18")), (4, 4), (1.5, Decimal("1.5"))],
)
def test_parse_quantity(text: str | int | float, value: int | Decimal) -> None:
    assert parse_quantity(text) == Decimal(value)


@pytest.mark.parametrize("bad", ["", "eight", "1.2.3x", "--1", "1Xi", *ABSURD])
def test_parse_quantity_rejects(bad: str) -> None:
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="quantity"):
        parse_quantity(bad)
    assert quantity_to_int(bad) == 0
    assert time.perf_counter() - t0 < 1.0  # refused before any expansion


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 1e300, 2**64, True, [], {}])
def test_parse_quantity_rejects_non_quantities(bad: Any) -> None:
    with pytest.raises(ValueError):
        parse_quantity(bad)
    assert quantity_to_int(bad) == 0


def test_quantity_to_int_rounds_fractions_up() -> None:
    assert quantity_to_int("500m") == 1
    assert quantity_to_int("-2") == 0


# the operator's old parse_quantity cases, now answered by the shared one
@pytest.mark.parametrize(("q", "n"), [("8", 8), (4, 4), ("8000m", 8), ("x", 0), (None, 0),
                                      ("2.0", 2)])
def test_quantity_to_int_whole_devices(q: Any, n: int) -> None:
    assert quantity_to_int(q) == n


def test_node_resource_count_reads_allocatable_then_capacity() -> None:
    gpu = "nvidia.com/gpu"
    assert node_resource_count({"allocatable": {gpu: "6"}, "capacity": {gpu: "8"}}) == 6
    assert node_resource_count({"capacity": {gpu: 8}}) == 8
    # allocatable reported as 0 means none (as kube-scheduler reads it), not "unknown"
    assert node_resource_count({"allocatable": {gpu: "0"}, "capacity": {gpu: "8"}}) == 0
    assert node_resource_count({"allocatable": {"cpu": "8"}}) == 0
    assert node_resource_count(None) == 0
    with pytest.raises(ValueError, match=r"status\.allocatable\['nvidia.com/gpu'\].*1e999"):
        node_resource_count({"allocatable": {gpu: "1e999"}})


def test_one_quantity_parser_in_src() -> None:
    """House rule, one formula once: no other module defines a quantity parser."""
    defs = []
    for path in SRC.rglob("*.py"):
        if "protos" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and \
                    "quantity" in node.name.lower() and not node.name.startswith("_"):
                defs.append(f"{path.relative_to(SRC)}:{node.name}")
    assert sorted(defs) == ["api/quantity.py:parse_quantity", "api/quantity.py:quantity_to_int"]
