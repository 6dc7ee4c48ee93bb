"""coalora: configuration-aware LoRA (CoA-LoRA) for quantized transformers.

Rooms (each subpackage's docstring says what lives there and what it may import): ``quant`` (options,
quantizer, configurations, allocation), ``nn`` (LoRA layers, mapper, the switchable model), ``data``,
``tasks`` (the LightningModules), ``search`` (the Pareto GP search), ``eval``, ``deploy`` (artifacts,
serving, PEFT export), ``commands`` and ``cli``; ``utils``, ``errors`` and ``pretrained`` serve them all.
"""

__version__ = "0.1.0"


def __getattr__(name: str):  # module-level lazy attribute (PEP 562)
    """``coalora.load`` without importing torch and transformers on ``import coalora``."""
    if name == "load":
        from coalora.deploy.loaded import load

        return load
    raise AttributeError(f"module 'coalora' has no attribute {name!r}")
