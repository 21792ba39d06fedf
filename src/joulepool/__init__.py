"""joulepool: energy- and carbon-aware LLM inference pools for Kubernetes."""
__version__ = "0.1.0"
