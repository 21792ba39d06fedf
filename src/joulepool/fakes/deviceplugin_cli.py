"""``joulepool device-plugin``: fake GPUs for kind (light module: heavy imports in ``run``)."""

from __future__ import annotations

import argparse
import os

from joulepool import envflags as ef


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Fake kubelet device plugin (v1beta1, gRPC on a unix socket): advertises N fake GPUs "
        "of a product, streams health changes, and allocates simulated GPUs to containers."
    )
    ef.add(parser, "--product", "JOULEPOOL_GPU_PRODUCT", None,
           help="GPU product, e.g. H100 (default: node label nvidia.com/gpu.product)")
    ef.add(parser, "--count", "JOULEPOOL_GPU_COUNT", None, type=int,
           help="number of fake GPUs (default: node label nvidia.com/gpu.count)")
    ef.add(parser, "--resource-name", "JOULEPOOL_RESOURCE_NAME", "nvidia.com/gpu",
           help="extended resource to advertise")
    ef.add(parser, "--kubelet-dir", "JOULEPOOL_KUBELET_DIR", "/var/lib/kubelet/device-plugins",
           help="kubelet device plugin directory (holds kubelet.sock)")
    ef.add(parser, "--endpoint", "JOULEPOOL_PLUGIN_ENDPOINT", "joulepool-fake-gpu.sock",
           help="this plugin's socket file name inside --kubelet-dir")
    ef.add(parser, "--node", "JOULEPOOL_NODE", os.environ.get("NODE_NAME") or None,
           help="node name (default $NODE_NAME; needed to read node labels)")
    ef.add(parser, "--gpu-state", "JOULEPOOL_GPU_STATE", None,
           help="shared simulated-GPU state file (created if missing); lost GPUs turn Unhealthy")
    ef.add(parser, "--gpu-state-host-path", "JOULEPOOL_GPU_STATE_HOST_PATH", None,
           help="the state file's path on the host, for the containers' mount "
                "(default --gpu-state)")
    ef.add(parser, "--state-mount-dir", "JOULEPOOL_STATE_MOUNT_DIR", "/var/run/joulepool-gpu",
           help="where Allocate mounts the state directory in containers")
    ef.add(parser, "--watch-interval", "JOULEPOOL_WATCH_INTERVAL", 1.0, type=float,
           help="seconds between checks of kubelet.sock and device health")
    ef.add(parser, "--kubernetes", "JOULEPOOL_KUBERNETES", "auto", choices=("auto", "on", "off"),
           help="read node labels from the API (auto: when running in a cluster)")


def run(args: argparse.Namespace) -> int:
    import asyncio
    import signal
    import socket

    from joulepool.cli import UsageError
    from joulepool.fakes.deviceplugin import FakeGPUDevicePlugin, product_and_count_from_node
    from joulepool.fakes.gpus import SimulatedGPUs, resolve_product

    node = args.node or socket.gethostname()
    product_name, count = args.product, args.count
    kube = args.kubernetes == "on" or (
        args.kubernetes == "auto" and bool(os.environ.get("KUBERNETES_SERVICE_HOST")))
    if (product_name is None or count is None) and kube:
        from joulepool.nodeagent.runner import load_kube_config

        try:
            load_kube_config()
            label_product, label_count = product_and_count_from_node(node)
        except Exception as exc:
            raise UsageError(f"cannot read labels of node {node!r}: {exc}") from None
        product_name = product_name or label_product
        count = count if count is not None else label_count
    if product_name is None or count is None:
        raise UsageError("give --product and --count (or label the node nvidia.com/gpu.product "
                         "and nvidia.com/gpu.count and run in the cluster)")
    try:
        product = resolve_product(product_name)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not 1 <= count <= 64:
        raise UsageError("--count must be in [1, 64]")
    if args.watch_interval <= 0:
        raise UsageError("--watch-interval must be > 0")
    gpus = None
    if args.gpu_state:
        gpus = SimulatedGPUs.open(args.gpu_state, product.name, count, node=node)
    try:
        plugin = FakeGPUDevicePlugin(
            product, count, node=node, resource_name=args.resource_name,
            kubelet_dir=args.kubelet_dir, endpoint=args.endpoint, gpu_state=gpus,
            gpu_state_host_path=args.gpu_state_host_path or args.gpu_state,
            state_mount_dir=args.state_mount_dir, watch_interval_s=args.watch_interval)
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print(f"joulepool device-plugin: {count} x {product.name} as {args.resource_name} "
              f"on {node}, kubelet dir {args.kubelet_dir}", flush=True)
        await plugin.run(stop)
        return 0

    return asyncio.run(main())
