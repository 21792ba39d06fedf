"""Node agent (MIAD clock control over NVML), simulated NVML and the fake vLLM engine."""
