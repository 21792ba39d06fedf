"""Node agent (``joulepool node-agent``): MIAD GPU clock control over NVML, energy metering."""
