"""argparse flags whose defaults come from ``JOULEPOOL_...`` environment variables.

A DaemonSet sets its agent's configuration in ``env:``; a flag on the command
line still wins. The variable is named in ``--help``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off", ""}


def env_bool(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise argparse.ArgumentTypeError(f"{name}={raw!r}: expected true/false")


def add(
    parser: argparse.ArgumentParser | Any,
    flag: str,
    env: str,
    default: Any = None,
    type: Callable[[str], Any] = str,
    help: str = "",
    **kw: Any,
) -> None:
    """``--flag`` with default ``$env`` (converted by ``type``), else ``default``."""
    raw = os.environ.get(env)
    value = raw if raw not in (None, "") else default
    shown = f" (env {env}; default {default})" if default is not None else f" (env {env})"
    parser.add_argument(flag, type=type, default=value, help=help + shown, **kw)


def add_list(parser: argparse.ArgumentParser | Any, flag: str, env: str, help: str = "",
             **kw: Any) -> None:
    """A repeatable flag; the env variable holds whitespace- or ';'-separated values."""
    raw = os.environ.get(env, "")
    values = [v for v in raw.replace(";", " ").split() if v]
    parser.add_argument(flag, action="append", default=None,
                        help=f"{help} (repeatable; env {env}, separated by spaces or ';')", **kw)
    parser.set_defaults(**{f"_env_{flag.lstrip('-').replace('-', '_')}": values})


def list_value(args: argparse.Namespace, flag: str) -> list[str]:
    dest = flag.lstrip("-").replace("-", "_")
    given = getattr(args, dest, None)
    if given:
        return list(given)
    return list(getattr(args, f"_env_{dest}", []) or [])


def add_bool(parser: argparse.ArgumentParser | Any, flag: str, env: str, help: str = "",
             default: bool = False) -> None:
    try:
        value = env_bool(env, default)
    except argparse.ArgumentTypeError as exc:  # reported by env_errors() when the command runs
        value = default
        parser.set_defaults(**{f"_env_error_{env}": str(exc)})
    parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value,
                        help=f"{help} (env {env}; default {default})")


def env_errors(args: argparse.Namespace) -> list[str]:
    """Bad boolean environment values seen while building the parser."""
    return [str(v) for k, v in sorted(vars(args).items()) if k.startswith("_env_error_")]
