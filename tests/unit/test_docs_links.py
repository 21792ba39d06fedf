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


def _docs() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _headings(text: str) -> list[str]:
    """The Markdown headings of ``text`` (outside fenced code), without their ``#``s."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            out.append(line.lstrip("#").strip())
    return out


def _anchors(text: str) -> set[str]:
    """GitHub's anchors of the headings: lower case, punctuation dropped, spaces to
    hyphens, ``-1``, ``-2`` ... on repeats."""
    seen: dict[str, int] = {}
    out = set()
    for heading in _headings(text):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_markdown_links_resolve_inside_the_repository() -> None:
    """Every relative link of README.md and docs/ (sub-folders included) names a file of
    the repository, and its ``#anchor``, if any, a heading of that file."""
    bad = []
    for doc in _docs():
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", doc.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            path = (doc.parent / target).resolve() if target else doc
            if not path.is_relative_to(ROOT) or not path.exists():
                bad.append(f"{doc.relative_to(ROOT)} -> {target}")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path.read_text()):
                bad.append(f"{doc.relative_to(ROOT)} -> {target}#{anchor}")
    assert not bad, bad
    assert "docs/architecture.md" in (ROOT / "README.md").read_text()


#: ``docs/planner.md, "Shared instances"``,
#: ``docs/experiments/planner.md, "Carbon at low load"`` and the like: a doc (under docs/,
#: sub-folders included) and a section of it, named in prose, code comments and
#: docstrings (the section's heading or bold lead starts so)
_SECTION_REF = re.compile(
    r'(docs/)?((?:[\w.-]+/)*[\w.-]+\.md),?:?\s+\(?(?:sections?\s+)?"([^"]+)"')


def test_sections_named_with_their_doc_exist() -> None:
    """A section that code, tests or docs name beside its doc (``docs/<page>.md, "Heading"``)
    is a heading of that doc or a paragraph's bold lead in it, and a doc named with its
    ``docs/`` path exists: moving or renaming a section or a page must update what points
    at it."""
    bad = []
    sources = [p for p in _files() if p.suffix in {".py", ".md"}]
    sources += [*(ROOT / "tests").rglob("*.py"), *(ROOT / "native").glob("*.cc")]
    for source in sources:
        text = re.sub(r"\s*\n\s*(?:#+|//)?\s*", " ", source.read_text(errors="replace"))
        for prefix, name, section in _SECTION_REF.findall(text):
            doc = ROOT / "docs" / name
            if not doc.exists():
                if prefix:  # named as a doc of docs/: a moved or deleted page
                    bad.append(f"{source.relative_to(ROOT)}: docs/{name} does not exist")
                continue
            target = doc.read_text()
            if not any(h.strip("`").startswith(section) for h in _headings(target)) \
                    and f"**{section}" not in re.sub(r"\s+", " ", target):
                bad.append(f"{source.relative_to(ROOT)}: {name} \"{section}\"")
    assert not bad, bad


def test_no_paragraph_of_the_docs_is_written_twice() -> None:
    """A doc says each thing once: a paragraph of three or more lines repeated within a
    doc is a botched edit (an empty pattern replaced once put one paragraph between
    every character of docs/planner.md, 96,000 lines)."""
    repeated = []
    for doc in _docs():
        seen: set[str] = set()
        for para in doc.read_text().split("\n\n"):
            if para.count("\n") < 2:
                continue
            if para in seen:
                repeated.append(f"{doc.relative_to(ROOT)}: {para[:60]!r}")
            seen.add(para)
    assert not repeated, repeated
