"""``joulepool crds``: write crds/*.yaml from the models."""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="crds", help="directory to write (default: crds)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if the files on disk differ from the models")


def run(args: argparse.Namespace) -> int:
    from joulepool.api.crd import crd_documents, render

    out = Path(args.out)
    stale = []
    for name, doc in crd_documents().items():
        path = out / name
        text = render(doc)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
            continue
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(path)
    if stale:
        print("out of date (run `joulepool crds`): " + ", ".join(stale))
        return 1
    return 0
