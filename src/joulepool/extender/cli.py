"""``joulepool extender``: the kube-scheduler extender service.

Light module: heavy imports (aiohttp, numpy, kubernetes) happen in :func:`run`.
"""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    from joulepool.extender.settings import add_arguments

    parser.epilog = (
        "Every flag --foo-bar can also be set as JOULEPOOL_EXTENDER_FOO_BAR or as 'foo-bar:' "
        "in the --config YAML file; flags win over the environment, which wins over the file."
    )
    add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from joulepool.cli import UsageError
    from joulepool.extender.app import create_app
    from joulepool.extender.settings import SettingsError, load_settings
    from joulepool.kube.service import ServeError, run_service

    try:
        run_service("extender", lambda: load_settings(args), SettingsError, create_app)
    except ServeError as exc:
        raise UsageError(str(exc)) from None
    return 0
