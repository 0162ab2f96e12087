"""adapterkit: a registry and toolkit for LoRA adapters."""

__version__ = "0.1.0"
