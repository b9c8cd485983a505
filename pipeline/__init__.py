"""gemma-quant: Gemma 4 checkpoints to quantized, Hub-ready folders, driven by YAML recipes."""

__version__ = "0.1.0"
