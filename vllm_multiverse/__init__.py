"""vllm-multiverse: serve Multiverse models on stock vLLM."""

__version__ = "0.1.0"
