"""One configuration mechanism for every component: flags > environment > YAML file > defaults.

A component declares its settings as a :class:`ComponentSettings` model: one typed
field per setting, with its default, its constraints and a description. From the
model this module derives

* the command-line flags (``--foo-bar`` for field ``foo_bar``; booleans also
  ``--no-foo-bar``; lists repeatable), with the description, the default and the
  environment variable in ``--help``;
* the environment variables: ``<ENV_PREFIX>FOO_BAR`` unless the field names its own
  (``setting(..., env="NODE_NAME")``, several names: the first one set wins). An empty
  value counts as unset (Helm renders optional values as ``""``);
* the YAML file given by ``--config`` or by the variable ``CONFIG_ENV``: a mapping of
  ``foo-bar`` (or ``foo_bar``) to values.

:func:`load` merges the layers and validates them once with pydantic. A value that
does not validate is never replaced by a default: :class:`SettingsError` names the
flag, the variable or the file key it came from, and the CLI turns it into exit code 2.
"""

from __future__ import annotations

import argparse
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

S = TypeVar("S", bound="ComponentSettings")

#: separators of list values in one environment variable (``a b;c``)
LIST_SEPARATORS = re.compile(r"[;\s]+")


class SettingsError(ValueError):
    """A bad flag, environment variable or config file value; the message names its source."""


class ComponentSettings(BaseModel):
    """Base of every component's settings model (flags > env > ``--config`` file > defaults)."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    #: prefix of the default environment variable names, e.g. ``JOULEPOOL_EXTENDER_``
    ENV_PREFIX: ClassVar[str] = "JOULEPOOL_"
    #: a variable starting with ENV_PREFIX that names no setting is an error (the prefix is
    #: the component's own); off where components share the ``JOULEPOOL_`` prefix
    STRICT_ENV: ClassVar[bool] = False
    #: the variable that names the YAML file (like ``--config``)
    CONFIG_ENV: ClassVar[str] = "JOULEPOOL_CONFIG"

    @classmethod
    def env_names(cls, name: str) -> tuple[str, ...]:
        """The environment variables of setting ``name``, first one set wins."""
        extra = _extra(cls.model_fields[name])
        env = extra.get("env")
        if env is None:
            return (cls.ENV_PREFIX + name.upper(),)
        return (env,) if isinstance(env, str) else tuple(env)


def setting(default: Any = None, description: str = "", *, env: str | Sequence[str] | None = None,
            group: str | None = None, variadic: bool = False, **constraints: Any) -> Any:
    """A settings field: ``Field`` plus its environment variable(s) and ``--help`` group.

    ``variadic`` (list settings): one flag may take several values, ``--foo a b``, as
    well as being repeated (the form another program's flag has, e.g. vLLM's)."""
    extra: dict[str, Any] = {}
    if env is not None:
        extra["env"] = env if isinstance(env, str) else list(env)
    if group is not None:
        extra["group"] = group
    if variadic:
        extra["variadic"] = True
    return Field(default, description=description, json_schema_extra=extra or None,
                 **constraints)


def _extra(field: FieldInfo) -> dict[str, Any]:
    extra = field.json_schema_extra
    return dict(extra) if isinstance(extra, dict) else {}


def flag(name: str) -> str:
    """The flag of setting ``name``: ``foo_bar`` -> ``--foo-bar``."""
    return "--" + name.replace("_", "-")


def _inner(annotation: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(_inner(annotation)) in (list, tuple)


def _metavar(annotation: Any) -> str:
    annotation = _inner(annotation)
    if typing.get_origin(annotation) is Literal:
        return "{" + ",".join(str(a) for a in typing.get_args(annotation)) + "}"
    if _is_list(annotation):
        annotation = typing.get_args(annotation)[0]
    return {int: "N", float: "X", Path: "PATH"}.get(annotation, "TEXT")


def add_arguments(parser: argparse.ArgumentParser, model: type[ComponentSettings]) -> None:
    """One flag per setting; argparse defaults stay None so the lower layers can fill them."""
    parser.add_argument("--config", metavar="FILE",
                        help=f"YAML file of settings, keys as the flags (env {model.CONFIG_ENV})")
    groups: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        group_name = _extra(field).get("group")
        target: Any = parser
        if group_name:
            target = groups.get(group_name) or parser.add_argument_group(group_name)
            groups[group_name] = target
        default = field.default
        shown = f"; default {default}" if default not in (None, [], ()) else ""
        help_text = f"{field.description} (env {' or '.join(model.env_names(name))}{shown})"
        help_text = help_text.replace("%", "%%")
        if _inner(field.annotation) is bool:
            target.add_argument(flag(name), dest=name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        elif _is_list(field.annotation) and _extra(field).get("variadic"):
            target.add_argument(flag(name), dest=name, action="extend", nargs="+",
                                default=None, metavar=_metavar(field.annotation),
                                help=help_text + " (one or more values, repeatable; in the "
                                "environment separated by spaces or ';')")
        elif _is_list(field.annotation):
            target.add_argument(flag(name), dest=name, action="append", default=None,
                                metavar=_metavar(field.annotation),
                                help=help_text + " (repeatable; in the environment separated "
                                "by spaces or ';')")
        else:
            target.add_argument(flag(name), dest=name, default=None,
                                metavar=_metavar(field.annotation), help=help_text)


def _config_layer(model: type[ComponentSettings], path: str) -> dict[str, Any]:
    from joulepool.api.load import load_yaml

    try:
        data = load_yaml(Path(path).read_text())
    except OSError as exc:
        raise SettingsError(f"--config {path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise SettingsError(f"--config {path}: invalid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"--config {path}: expected a mapping of setting: value")
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in model.model_fields:
            known = ", ".join(sorted(n.replace("_", "-") for n in model.model_fields))
            raise SettingsError(f"--config {path}: unknown setting {key!r} (known: {known})")
        out[name] = value
    return out


def _env_layer(model: type[ComponentSettings], environ: Mapping[str, str]
               ) -> dict[str, tuple[Any, str]]:
    out: dict[str, tuple[Any, str]] = {}
    claimed = {model.CONFIG_ENV}
    for name, field in model.model_fields.items():
        names = model.env_names(name)
        claimed.update(names)
        for var in names:
            raw = environ.get(var)
            if raw is None or raw.strip() == "":
                continue
            value: Any = raw
            if _is_list(field.annotation):
                value = [v for v in LIST_SEPARATORS.split(raw) if v]
            out[name] = (value, var)
            break
    if model.STRICT_ENV:
        for var in environ:
            if var.startswith(model.ENV_PREFIX) and var not in claimed:
                raise SettingsError(f"unknown environment variable {var}")
    return out


def load(model: type[S], args: argparse.Namespace | None = None,
         environ: Mapping[str, str] | None = None) -> S:
    """Merge flags (``args``) > ``environ`` (default ``os.environ``) > config file > defaults.

    Raises :class:`SettingsError` naming the flag, variable or file of the first bad value.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    config = getattr(args, "config", None) or env.get(model.CONFIG_ENV) or None
    if config:
        for k, v in _config_layer(model, config).items():
            values[k], sources[k] = v, f"--config {config}: {k.replace('_', '-')}"
    for k, (v, var) in _env_layer(model, env).items():
        values[k], sources[k] = v, var
    if args is not None:
        for k in model.model_fields:
            v = getattr(args, k, None)
            if v is not None:
                values[k], sources[k] = v, flag(k)
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise SettingsError(_describe(exc, sources, values)) from None


def _describe(exc: ValidationError, sources: Mapping[str, str], values: Mapping[str, Any]) -> str:
    err = exc.errors()[0]
    loc = str(err["loc"][0]) if err["loc"] else ""
    msg = str(err["msg"]).removeprefix("Value error, ")
    if not loc:
        return msg
    where = sources.get(loc, flag(loc))
    if loc in values:
        return f"{where}={values[loc]!r}: {msg}"
    return f"{where}: {msg}"
