"""Build joulepool's compiled ext_proc front end (``native/eppnative.cc``) in place:
``src/joulepool/router/_eppnative<EXT_SUFFIX>``, imported by
``joulepool.router.epp_native``; and ``joulepool bench picker``'s compiled load
generator (``native/eppload.cc``) as ``build/native/eppload``.

Needs a C++17 compiler, grpc++ and protobuf with pkg-config files, ``protoc`` and
``grpc_cpp_plugin`` (Debian: the packages in ``native/debian-packages.txt``, the list
the Dockerfile installs too) and Python's headers (Debian's interpreter:
``libpython3.X-dev``); ``make native`` installs what ``--apt-missing`` lists with apt as
root. Envoy's ext_proc ``.proto`` sources are not shipped
anywhere installable, but the ``xds-protos`` wheel's ``*_pb2`` modules carry the
serialised descriptors: this script writes those of
``envoy/service/ext_proc/v3/external_processor.proto`` and its imports as a
FileDescriptorSet, and protoc generates the C++ messages and the gRPC service from it
(generated code lives in ``build/native/``, never in the repository); gRPC's health
service (``grpc_health/v1/health.proto``) comes the same way from
``grpcio-health-checking``.

When a tool is missing it prints why, records the reason in
``build/native/UNAVAILABLE`` (the tests' skip reason) and exits 0 (the Python front
end serves then); ``--require`` makes that exit 2. Objects are rebuilt only when
their source changed.

    python native/build.py [--require] [--jobs N]
    python native/build.py --apt-missing   # the Debian packages still needed here
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "native"
SOURCE = ROOT / "native" / "eppnative.cc"
TARGET = ROOT / "src" / "joulepool" / "router" / ("_eppnative" + str(
    sysconfig.get_config_var("EXT_SUFFIX")))
#: the compiled load generator of ``joulepool bench picker`` (native/eppload.cc): a
#: program, not part of the package
LOADGEN_SOURCE = ROOT / "native" / "eppload.cc"
LOADGEN = BUILD / "eppload"
UNAVAILABLE = BUILD / "UNAVAILABLE"
CXXFLAGS = ["-std=c++17", "-O2", "-fPIC", "-fvisibility=hidden", "-DNDEBUG"]
#: the Debian packages that provide what the build needs, one per line ('#': a comment);
#: the Dockerfile's build stage installs the same file
APT_PACKAGES_FILE = ROOT / "native" / "debian-packages.txt"


def apt_packages() -> tuple[str, ...]:
    """The Debian packages of :data:`APT_PACKAGES_FILE`, in its order."""
    lines = APT_PACKAGES_FILE.read_text().splitlines()
    return tuple(line.strip() for line in lines if line.strip() and not line.startswith("#"))


APT_PACKAGES = apt_packages()


class Unavailable(Exception):
    """The build cannot run here (the message says what is missing)."""


def _python_headers() -> Path:
    """Where this interpreter's ``Python.h`` belongs."""
    return Path(sysconfig.get_paths()["include"]) / "Python.h"


def _python_headers_package() -> str | None:
    """Debian's package of this interpreter's headers (``libpython3.X-dev``), or None
    when the interpreter is not Debian's (its headers come with it)."""
    if not str(_python_headers()).startswith("/usr/include/"):
        return None
    return f"libpython{sys.version_info.major}.{sys.version_info.minor}-dev"


def apt_missing() -> list[str]:
    """The Debian packages the build still lacks here (``make native`` installs them as
    root): the compiler, grpc++ and protobuf ones unless all their tools and pkg-config
    files are found, and Python's headers where the interpreter is Debian's."""
    missing: list[str] = []
    tools = all(shutil.which(t) for t in ("g++", "pkg-config", "protoc", "grpc_cpp_plugin"))
    if not tools or subprocess.run(["pkg-config", "--exists", "grpc++", "protobuf"],
                                   capture_output=True).returncode != 0:
        missing += APT_PACKAGES
    headers = _python_headers_package()
    if not _python_headers().exists() and headers is not None:
        missing.append(headers)
    return missing


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise Unavailable(f"{name} not found (Debian: apt-get install "
                          f"{' '.join(APT_PACKAGES)})")
    return path


def _pkg_config(*args: str) -> list[str]:
    res = subprocess.run([_tool("pkg-config"), *args, "grpc++", "protobuf"],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise Unavailable(f"pkg-config grpc++ protobuf: {res.stderr.strip()} (Debian: "
                          "libgrpc++-dev libprotobuf-dev)")
    return shlex.split(res.stdout)


def descriptor_set() -> tuple[bytes, list[str]]:
    """The serialised FileDescriptorSet of Envoy's ext_proc service and its imports
    (from the xds-protos wheel) and of gRPC's health service (grpcio-health-checking),
    and the files to generate (Google's well-known types come with libprotobuf)."""
    from envoy.service.ext_proc.v3 import external_processor_pb2
    from google.protobuf import descriptor_pb2
    from grpc_health.v1 import health_pb2

    files: dict[str, descriptor_pb2.FileDescriptorProto] = {}

    def add(fd: object) -> None:
        name = fd.name  # type: ignore[attr-defined]
        if name in files:
            return
        for dep in fd.dependencies:  # type: ignore[attr-defined]
            add(dep)
        proto = descriptor_pb2.FileDescriptorProto()
        fd.CopyToProto(proto)  # type: ignore[attr-defined]
        files[name] = proto

    add(external_processor_pb2.DESCRIPTOR)
    add(health_pb2.DESCRIPTOR)
    fds = descriptor_pb2.FileDescriptorSet(file=list(files.values()))
    wanted = [n for n in files if not n.startswith("google/protobuf/")]
    return fds.SerializeToString(), wanted


def generate() -> list[Path]:
    """protoc's C++ sources of the ext_proc protos (regenerated when the descriptors or
    protoc's version changed, or the last generation failed); the ``.cc`` files to
    compile."""
    desc, names = descriptor_set()
    gen = BUILD / "gen"
    desc_path = BUILD / "ext_proc.desc"
    protoc = _tool("protoc")
    version = subprocess.run([protoc, "--version"], capture_output=True, text=True,
                             check=True).stdout.strip()
    stamp = BUILD / "gen.stamp"  # written once protoc succeeded: what gen/ was made from
    made_from = f"{version}\n{hashlib.sha256(desc).hexdigest()}\n"
    if not gen.exists() or not stamp.exists() or stamp.read_text() != made_from:
        stamp.unlink(missing_ok=True)
        shutil.rmtree(gen, ignore_errors=True)
        gen.mkdir(parents=True)
        desc_path.write_bytes(desc)
        plugin = _tool("grpc_cpp_plugin")
        cmd = [protoc, f"--descriptor_set_in={desc_path}", f"--cpp_out={gen}",
               f"--grpc_out={gen}", f"--plugin=protoc-gen-grpc={plugin}", *names]
        subprocess.run(cmd, check=True)
        stamp.write_text(made_from)
    sources = [gen / n.replace(".proto", ".pb.cc") for n in names]
    sources.append(gen / "envoy/service/ext_proc/v3/external_processor.grpc.pb.cc")
    sources.append(gen / "grpc_health/v1/health.grpc.pb.cc")
    return sources


def _compile(cxx: str, src: Path, obj: Path, flags: list[str],
             headers: Sequence[Path] = ()) -> None:
    """``obj`` from ``src``, unless it is newer than ``src`` and the generated
    ``headers`` it includes."""
    newest = max(f.stat().st_mtime for f in (src, *headers))
    if obj.exists() and obj.stat().st_mtime >= newest:
        return
    obj.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([cxx, *CXXFLAGS, *flags, "-c", str(src), "-o", str(obj)], check=True)


def build(jobs: int) -> Path:
    cxx = os.environ.get("CXX") or _tool("g++")
    include = str(_python_headers().parent)
    if not _python_headers().exists():
        package = _python_headers_package()
        raise Unavailable(f"Python.h not found in {include} (Python's development headers"
                          + (f"; Debian: apt-get install {package})" if package else ")"))
    cflags = _pkg_config("--cflags")
    libs = _pkg_config("--libs")
    BUILD.mkdir(parents=True, exist_ok=True)
    sources = generate()
    flags = [f"-I{BUILD / 'gen'}", f"-I{include}", *cflags]
    objs = [BUILD / "obj" / (s.relative_to(BUILD / "gen").as_posix().replace("/", "__") + ".o")
            for s in sources]
    generated = objs[:]
    objs.append(BUILD / "obj" / "eppnative.o")
    loadgen_obj = BUILD / "obj" / "eppload.o"
    headers = sorted((BUILD / "gen").rglob("*.h"))  # regenerated: everything recompiles
    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
        list(pool.map(lambda so: _compile(cxx, so[0], so[1], flags, headers),
                      [*zip(sources, generated, strict=True), (SOURCE, objs[-1]),
                       (LOADGEN_SOURCE, loadgen_obj)]))
    _link(cxx, TARGET, objs, ["-shared", *libs])
    _link(cxx, LOADGEN, [*generated, loadgen_obj], libs)
    return TARGET


def _link(cxx: str, target: Path, objs: Sequence[Path], flags: Sequence[str]) -> None:
    """``target`` from ``objs``, unless it is newer than all of them."""
    newest = max(o.stat().st_mtime for o in objs)
    if not target.exists() or target.stat().st_mtime < newest:
        tmp = target.with_name(target.name + ".tmp")
        subprocess.run([cxx, "-o", str(tmp), *map(str, objs), *flags], check=True)
        tmp.replace(target)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--require", action="store_true",
                    help="exit 2 when the build cannot run here (default: say why, exit 0)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--apt-missing", action="store_true",
                    help="print the Debian packages the build still lacks here (none: an "
                    "empty line) and exit")
    args = ap.parse_args(argv)
    if args.apt_missing:
        print(" ".join(apt_missing()))
        return 0
    try:
        target = build(args.jobs)
    except Unavailable as exc:
        BUILD.mkdir(parents=True, exist_ok=True)
        UNAVAILABLE.write_text(str(exc) + "\n")
        print(f"native ext_proc front end not built: {exc}", file=sys.stderr)
        return 2 if args.require else 0
    except subprocess.CalledProcessError as exc:
        print(f"native ext_proc front end: build failed: {exc}", file=sys.stderr)
        return 1
    UNAVAILABLE.unlink(missing_ok=True)
    print(f"native ext_proc front end built: {target.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
