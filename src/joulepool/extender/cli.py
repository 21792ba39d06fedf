"""``joulepool extender``: the scheduler extender and request router service.

Light module: heavy imports (aiohttp, numpy, kubernetes) happen in :func:`run`.
"""

from __future__ import annotations

import argparse
from typing import Any


def configure(parser: argparse.ArgumentParser) -> None:
    from joulepool.extender.settings import add_arguments

    parser.epilog = (
        "Every flag --foo-bar can also be set as JOULEPOOL_EXTENDER_FOO_BAR or as 'foo-bar:' "
        "in the --config YAML file; flags win over the environment, which wins over the file."
    )
    add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from joulepool.cli import UsageError
    from joulepool.extender.app import EXTENDER, create_app, ssl_context
    from joulepool.extender.files import FileError
    from joulepool.extender.settings import SettingsError, load_settings
    from joulepool.httpserve import serve_until_signalled, urls

    log = logging.getLogger("joulepool.extender")
    try:
        settings = load_settings(args)
        settings.check_sources()
    except SettingsError as exc:
        raise UsageError(str(exc)) from None
    try:
        app = create_app(settings)
    except FileError as exc:
        raise UsageError(str(exc)) from None
    if settings.cluster:
        from joulepool.extender.watch import load_kube_config

        try:
            app[EXTENDER].api_client = load_kube_config(
                str(settings.kubeconfig) if settings.kubeconfig else None
            )
        except Exception as exc:  # ConfigException, missing file, bad YAML
            raise UsageError(
                f"cannot load a Kubernetes configuration ({exc}); "
                "use --kubeconfig, run in a cluster, or --no-cluster with files"
            ) from None
    try:
        ctx = ssl_context(settings)
    except (OSError, ValueError) as exc:
        raise UsageError(f"TLS: {exc}") from None

    def started(runner: Any) -> None:
        listening = urls(runner, tls=ctx is not None)
        print(f"joulepool extender listening on {' '.join(listening)}", flush=True)
        log.info("listening on %s", listening)

    try:
        asyncio.run(serve_until_signalled(
            app, settings.host, settings.port, ssl_context=ctx,
            header_timeout_s=settings.header_timeout_seconds, on_started=started))
    except OSError as exc:
        raise UsageError(f"cannot listen on {settings.host}:{settings.port}: {exc}") from None
    return 0
