"""Nothing in the repository points at files outside it; the docs' links resolve."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: design files of the workspace the project started in (not part of the repository)
OUTSIDE = ("shared/design", "shared/papers", "ARCHITECTURE.md", "CALIBRATION.md")
TEXT = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".tpl", ".sh", ".cfg"}


def _files() -> list[Path]:
    out = []
    for sub in ("src", "docs", "charts", "kind", "benchmarks", "scripts", "examples"):
        out += [p for p in (ROOT / sub).rglob("*") if p.is_file() and p.suffix in TEXT
                and "egg-info" not in str(p)]
    return [*out, ROOT / "README.md", ROOT / "Makefile", ROOT / "pyproject.toml"]


def test_no_reference_to_design_files_outside_the_repository() -> None:
    hits = [f"{p.relative_to(ROOT)}: {word}" for p in _files() for word in OUTSIDE
            if word in p.read_text(errors="replace")]
    assert not hits, hits


def test_markdown_links_resolve_inside_the_repository() -> None:
    bad = []
    for doc in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)", doc.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            path = (doc.parent / target).resolve()
            if not path.is_relative_to(ROOT) or not path.exists():
                bad.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not bad, bad
    assert "docs/architecture.md" in (ROOT / "README.md").read_text()


def test_no_paragraph_of_the_docs_is_written_twice() -> None:
    """A doc says each thing once: a paragraph of three or more lines repeated within a
    doc is a botched edit (an empty pattern replaced once put one paragraph between
    every character of docs/planner.md, 96,000 lines)."""
    repeated = []
    for doc in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        seen: set[str] = set()
        for para in doc.read_text().split("\n\n"):
            if para.count("\n") < 2:
                continue
            if para in seen:
                repeated.append(f"{doc.relative_to(ROOT)}: {para[:60]!r}")
            seen.add(para)
    assert not repeated, repeated
