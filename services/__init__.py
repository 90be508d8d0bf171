"""qsens: how quantization changes an LLM's trait vectors. One package, one module per service."""

__version__ = "0.1.0"
