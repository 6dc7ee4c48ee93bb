"""Torch modules: the one LoRA layer family and its backend dispatch (``lora``), the configuration-aware
network (``mapper``), the dequantized-weight cache (``weight_cache``) and the backbone with LoRA on every
target matrix, switchable between configurations (``model``). May import :mod:`coalora.quant` and the
helpers; never Lightning, data or tasks."""
