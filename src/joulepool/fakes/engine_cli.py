"""``joulepool fake-engine``: a stand-in vLLM server on a simulated GPU (light module)."""

from __future__ import annotations

import argparse
import os

from joulepool import envflags as ef


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "A stand-in vLLM server: OpenAI /v1/completions (streaming and not), /metrics with vLLM "
        "names, /health. Tokens come at the speed the simulated GPU allows at its current clock "
        "and batch (core profiles); the clock is read from the GPU state file the node agent "
        "controls."
    )
    ef.add(parser, "--host", "JOULEPOOL_ENGINE_HOST", "0.0.0.0", help="listen address")
    ef.add(parser, "--port", "JOULEPOOL_ENGINE_PORT", 8000, type=int, help="listen port")
    ef.add(parser, "--product", "JOULEPOOL_GPU_PRODUCT", None,
           help="GPU product (default: the GPU's in --gpu-state, else H100)")
    ef.add(parser, "--model", "JOULEPOOL_MODEL", "llama-3.1-8b",
           help="served model whose profile sets the speed")
    ef.add(parser, "--served-model-name", "JOULEPOOL_SERVED_MODEL_NAME", None,
           help="model name in the API (default --model)")
    ef.add(parser, "--gpu-state", "JOULEPOOL_GPU_STATE", None,
           help="shared simulated-GPU state file (the sidecar's --gpu-state); without it the "
                "engine runs at the product's maximum clock")
    ef.add(parser, "--gpu-index", "JOULEPOOL_GPU_INDEX", None,
           help="this engine's GPUs in the state, e.g. 0 or 0,1 (default 0 with --gpu-state; "
                "the device plugin's Allocate sets JOULEPOOL_GPU_INDEX)")
    ef.add(parser, "--max-batch", "JOULEPOOL_MAX_BATCH", None, type=int,
           help="most requests in the running batch (default: the profile's)")
    ef.add(parser, "--node", "JOULEPOOL_NODE", os.environ.get("NODE_NAME") or "node",
           help="node name written if the engine creates the state file")


def run(args: argparse.Namespace) -> int:
    from aiohttp import web

    from joulepool.cli import UsageError
    from joulepool.core.profiles import DEFAULT_PROFILES, find_profile
    from joulepool.fakes.engine import FakeEngine, build_app
    from joulepool.fakes.gpus import SimulatedGPUs, resolve_product

    if not 1 <= args.port <= 65535:
        raise UsageError("--port must be in [1, 65535]")
    indices: list[int] = []
    if args.gpu_index:
        try:
            indices = sorted({int(x) for x in str(args.gpu_index).split(",") if x.strip()})
        except ValueError:
            raise UsageError(f"--gpu-index must be integers like 0 or 0,1, got "
                             f"{args.gpu_index!r}") from None
        if any(i < 0 for i in indices):
            raise UsageError("--gpu-index must be >= 0")
    elif args.gpu_state:
        indices = [0]
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
    if args.max_batch is not None and args.max_batch < 1:
        raise UsageError("--max-batch must be >= 1")
    engine = FakeEngine(profile, gpus, indices, max_batch=args.max_batch)
    app = build_app(engine, args.served_model_name)
    print(f"joulepool fake-engine: {profile.model} on {profile.mode} "
          f"(GPUs {indices or 'none'}) at http://{args.host}:{args.port}", flush=True)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)
    return 0
