"""gpufleet: turn a pool of GPUs — one box or a Kubernetes cluster — into one OpenAI-compatible LLM service."""

__version__ = "0.1.0"
__all__ = ["__version__"]
