"""The container image: one slim, non-root image whose entrypoint is `joulepool`."""

from __future__ import annotations

import importlib.util
import json
import re
from types import ModuleType

from chartlib import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()
IGNORE = (ROOT / ".dockerignore").read_text().splitlines()


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _final_stage() -> list[tuple[str, str]]:
    ins = _instructions()
    last_from = max(i for i, (w, _) in enumerate(ins) if w == "FROM")
    return ins[last_from:]


def _native_build() -> ModuleType:
    """native/build.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("native_build", ROOT / "native" / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_native_package_list_is_what_the_image_copies_first() -> None:
    # the build stage copies the list alone before installing it (the apt layer stays
    # cached while the sources change); the file parses to package names only
    copies = [r for w, r in _instructions() if w == "COPY"]
    assert copies[0] == "native/debian-packages.txt native/"
    names = _native_build().apt_packages()
    assert names and all(re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", n) for n in names)


def test_slim_python_base() -> None:
    args = dict(r.split("=", 1) for w, r in _instructions() if w == "ARG" and "=" in r)
    # pinned to Debian 12: the final stage names bookworm's runtime packages
    assert args["PYTHON_IMAGE"] == "python:3.11-slim-bookworm"
    froms = [r for w, r in _instructions() if w == "FROM"]
    assert froms and all(f.split()[0] == "${PYTHON_IMAGE}" for f in froms)


def test_runs_as_a_numeric_non_root_user() -> None:
    users = [r for w, r in _final_stage() if w == "USER"]
    assert users, "no USER in the final stage"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    assert uid == "65532"  # the chart's runAsUser


def test_entrypoint_is_joulepool() -> None:
    (entry,) = [r for w, r in _final_stage() if w == "ENTRYPOINT"]
    assert json.loads(entry) == ["joulepool"]


def test_final_stage_copies_only_the_venv() -> None:
    copies = [r for w, r in _final_stage() if w == "COPY"]
    assert copies == ["--from=build /opt/joulepool /opt/joulepool"]


def test_dockerignore_keeps_the_context_small() -> None:
    assert IGNORE[0] == ("# Only pyproject.toml, README.md, src/ and native/ are needed to "
                         "build the image.")
    rules = [r for r in IGNORE if r and not r.startswith("#")]
    assert rules[0] == "**"  # everything out, then only what the build copies
    allowed = {r[1:] for r in rules if r.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "src/", "native/"}
    copied = {r.split()[0].split("/")[0] for w, r in _instructions()
              if w == "COPY" and "--from" not in r}
    assert copied <= {"pyproject.toml", "src", "native"}
    assert "src/**/_eppnative*.so" in rules  # no host-built extension in the image


def test_the_image_builds_and_loads_the_native_front_end() -> None:
    # the build stage compiles native/eppnative.cc (failing the build if it cannot), the
    # package ships the extension, and the final stage has its libraries and loads it
    first_from = [i for i, (w, _) in enumerate(_instructions()) if w == "FROM"][1]
    build = " ".join(r for w, r in _instructions()[:first_from] if w == "RUN")
    # its Debian packages: the one list native/build.py (`make native`) reads too
    packages = _native_build().APT_PACKAGES
    assert "libgrpc++-dev" in packages and "protobuf-compiler-grpc" in packages
    assert ("apt-get install -y --no-install-recommends "
            "$(grep -v '^#' native/debian-packages.txt)") in build
    assert not [p for p in packages if p in build]  # spelled nowhere else
    assert build.index("apt-get install") < build.index("native/build.py --require")
    assert build.index("native/build.py --require") < build.index("pip install --no-deps .")
    final = " ".join(r for w, r in _final_stage() if w == "RUN")
    assert "libgrpc++1.51" in final and "libprotobuf32" in final
    assert 'python -c "import joulepool.router._eppnative"' in final
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "router/_eppnative*.so" in data["tool"]["setuptools"]["package-data"]["joulepool"]
