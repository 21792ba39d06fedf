"""Stand-ins for hardware and other programs, for kind and for tests.

- :mod:`joulepool.fakes.gpus`: simulated NVML (GPU physics from ``core.profiles``);
- :mod:`joulepool.fakes.engine`: a fake vLLM server on a simulated GPU (``joulepool fake-engine``);
- :mod:`joulepool.fakes.deviceplugin`: a fake kubelet device plugin (``joulepool device-plugin``).

Nothing in production imports this package except the node agent's ``--backend simulated``.
"""
