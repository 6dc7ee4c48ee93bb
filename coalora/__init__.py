"""coalora: configuration-aware LoRA (CoA-LoRA) for quantized transformers."""

__version__ = "0.1.0"


def __getattr__(name: str):  # module-level lazy attribute (PEP 562)
    """``coalora.load`` without importing torch and transformers on ``import coalora``."""
    if name == "load":
        from coalora.export import load

        return load
    raise AttributeError(f"module 'coalora' has no attribute {name!r}")
