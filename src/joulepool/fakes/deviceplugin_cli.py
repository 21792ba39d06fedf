"""``joulepool device-plugin``: fake GPUs for kind (light module: heavy imports in ``run``)."""

from __future__ import annotations

import argparse
import os


def configure(parser: argparse.ArgumentParser) -> None:
    from joulepool.fakes.settings import DevicePluginSettings
    from joulepool.settings import add_arguments

    parser.description = (
        "Fake kubelet device plugin (v1beta1, gRPC on a unix socket): advertises N fake GPUs "
        "of a product, streams health changes, and allocates simulated GPUs to containers."
    )
    add_arguments(parser, DevicePluginSettings)


def run(args: argparse.Namespace) -> int:
    import asyncio
    import signal
    import socket

    from joulepool.cli import UsageError
    from joulepool.fakes.deviceplugin import FakeGPUDevicePlugin, product_and_count_from_node
    from joulepool.fakes.gpus import SimulatedGPUs, resolve_product
    from joulepool.fakes.settings import DevicePluginSettings
    from joulepool.settings import SettingsError, load

    try:
        settings = load(DevicePluginSettings, args)
    except SettingsError as exc:
        raise UsageError(str(exc)) from None
    node = settings.node or socket.gethostname()
    product_name, count = settings.product, settings.count
    kube = settings.kubernetes == "on" or (
        settings.kubernetes == "auto" and bool(os.environ.get("KUBERNETES_SERVICE_HOST")))
    if (product_name is None or count is None) and kube:
        from kubernetes import config

        try:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
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
    gpus = None
    if settings.gpu_state:
        gpus = SimulatedGPUs.open(settings.gpu_state, product.name, count, node=node)
    try:
        plugin = FakeGPUDevicePlugin(
            product, count, node=node, resource_name=settings.resource_name,
            kubelet_dir=settings.kubelet_dir, endpoint=settings.endpoint, gpu_state=gpus,
            gpu_state_host_path=settings.gpu_state_host_path or settings.gpu_state,
            state_mount_dir=settings.state_mount_dir, watch_interval_s=settings.watch_interval)
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print(f"joulepool device-plugin: {count} x {product.name} as {settings.resource_name} "
              f"on {node}, kubelet dir {settings.kubelet_dir}", flush=True)
        await plugin.run(stop)
        return 0

    return asyncio.run(main())
