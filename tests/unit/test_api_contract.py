"""Every label, annotation and resource name of the Kubernetes contract is spelled once,
in ``joulepool.api.contract``: no shell has a string literal equal to one of them."""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import joulepool
from joulepool.api import contract

SRC = Path(joulepool.__file__).parent
SHELLS = ("operator", "extender", "router", "kube", "nodeagent", "fakes", "carbon", "sim")
#: test fixtures that build whole Node/Pod objects the way a cluster would show them
FIXTURES = {"extender/testing.py", "kube/testing.py"}


def _names() -> dict[str, str]:
    """value -> constant name, for the contract's names (labels, annotations, resources)."""
    out = {}
    for name, value in vars(contract).items():
        if name.isupper() and isinstance(value, str) and ("/" in value or "." in value):
            out[value] = name
    for name in ("INFERENCEPOOLS", "GPUPROFILES", "ENERGYPOLICIES"):  # plural resource names
        out[getattr(contract, name)] = name
    return out


def _ports() -> dict[int, str]:
    """port -> constant name, for the contract's ports."""
    return {value: name for name, value in vars(contract).items()
            if name.endswith("_PORT") and isinstance(value, int)}


def _literals(path: Path) -> list[tuple[int, str | int]]:
    found: list[tuple[int, str | int]] = []
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    for tok in tokens:
        if tok.type == tokenize.NUMBER and tok.string.isdigit():
            found.append((tok.start[0], int(tok.string)))
        elif tok.type == tokenize.STRING:
            try:
                value = ast.literal_eval(tok.string)
            except (ValueError, SyntaxError):
                continue  # f-strings
            if isinstance(value, str):
                found.append((tok.start[0], value))
    return found


def test_no_shell_spells_a_contract_name_or_port() -> None:
    names: dict[str | int, str] = {**_names(), **_ports()}
    assert "joulepool.dev/pool" in names and "nvidia.com/gpu" in names and 8000 in names
    spelled = []
    for shell in SHELLS:
        for path in sorted((SRC / shell).rglob("*.py")) if (SRC / shell).is_dir() else []:
            rel = str(path.relative_to(SRC))
            if rel in FIXTURES:
                continue
            for line, value in _literals(path):
                if value in names:
                    spelled.append(f"{rel}:{line}: {value!r} (use contract.{names[value]})")
    assert not spelled, "\n".join(spelled)
