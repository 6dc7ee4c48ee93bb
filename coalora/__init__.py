"""coalora: configuration-aware LoRA (CoA-LoRA) for quantized transformers."""

__version__ = "0.1.0"
