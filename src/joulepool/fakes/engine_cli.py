"""``joulepool fake-engine``: a stand-in vLLM server on a simulated GPU (light module)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiohttp import web

    from joulepool.fakes.settings import FakeEngineSettings


def configure(parser: argparse.ArgumentParser) -> None:
    from joulepool.fakes.settings import FakeEngineSettings
    from joulepool.settings import add_arguments

    parser.description = (
        "A stand-in vLLM server: OpenAI /v1/completions (streaming and not), /metrics with vLLM "
        "names, /health. Tokens come at the speed the simulated GPU allows at its current clock "
        "and batch (core profiles); the clock is read from the GPU state file the node agent "
        "controls."
    )
    add_arguments(parser, FakeEngineSettings)


def run(args: argparse.Namespace) -> int:
    from joulepool.cli import UsageError
    from joulepool.fakes.settings import FakeEngineSettings
    from joulepool.settings import SettingsError, load

    try:
        settings = load(FakeEngineSettings, args)
    except SettingsError as exc:
        raise UsageError(str(exc)) from None
    return serve(settings)


def _print_listening(runner: web.AppRunner) -> None:
    """The addresses bound, as the router and extender print theirs: ``joulepool
    fake-engine listening on http://HOST:PORT`` (with ``--port 0``, the port the system
    chose), so that a harness starting it reads where to send requests."""
    from joulepool.httpserve import urls

    print(f"joulepool fake-engine listening on {' '.join(urls(runner))}", flush=True)


def serve(args: FakeEngineSettings) -> int:
    """Build the fake engine the settings describe and serve it until interrupted."""
    import asyncio

    from joulepool.cli import UsageError
    from joulepool.core.profiles import DEFAULT_PROFILES, find_profile
    from joulepool.fakes.engine import FakeEngine, build_app
    from joulepool.fakes.gpus import SimulatedGPUs, resolve_product
    from joulepool.httpserve import serve_until_signalled

    indices: list[int] = list(args.gpu_index or ([0] if args.gpu_state else []))
    gpus = None
    product_name = args.product
    if args.gpu_state:
        gpus = SimulatedGPUs.open(args.gpu_state)
        state = gpus.store.read()
        if state and state.get("gpus"):
            have = len(state["gpus"])
            if any(i >= have for i in indices):
                raise UsageError(f"--gpu-index {args.gpu_index}: the state has {have} GPU(s)")
            product_name = product_name or str(state["gpus"][indices[0]]["product"])
        else:
            gpus.ensure(product_name or "H100", max(indices) + 1, node=args.node)
    product_name = product_name or "H100"
    try:
        product = resolve_product(product_name)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    tp = max(len(indices), 1)
    profile = find_profile(product.name, args.model, tp) or find_profile(product.name, args.model)
    if profile is None:
        known = sorted({p.model for p in DEFAULT_PROFILES if p.product.name == product.name})
        raise UsageError(f"no profile for model {args.model!r} on {product.name}; known: {known}")
    from joulepool.fakes.engine import EngineMetrics

    try:
        metrics = EngineMetrics(profile.model, indices, profile.product.name,
                                engine=args.engine)
    except ValueError as exc:
        raise UsageError(f"--engine: {exc}") from None
    engine = FakeEngine(profile, gpus, indices, max_batch=args.max_batch, metrics=metrics)
    app = build_app(engine, args.served_model_name)
    print(f"joulepool fake-engine: {profile.model} on {profile.mode} "
          f"(GPUs {indices or 'none'})", flush=True)
    try:
        asyncio.run(serve_until_signalled(app, args.host, args.port,
                                          on_started=_print_listening))
    except OSError as exc:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {exc}") from None
    return 0
