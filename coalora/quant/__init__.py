"""Quantization, without Lightning: the code families and their registry (``families``: ``nf`` and ``int``,
and ``gguf``, are registered by importing this package), the option space (``options``), the codebook search
(``codebooks``), the double quantizer and its packed form (``quantizer``), configurations and their files
(``qconfig``), the target matrices of a model (``targets``), error tables (``error_table``), the knapsack
solver (``knapsack``), allocation of configurations to bit budgets (``allocate``), the empirical Fisher
(``fisher``), the tables' weightings (``error_weighting``) and LQ-LoRA's decomposition (``lqlora``). May
import only :mod:`coalora.errors`, :mod:`coalora.utils` and :mod:`coalora.pretrained` (the Fisher loads a
language-model head); the one exception, imported where used, is ``error_weighting.backbone_hessians``,
which wraps a plain backbone in :class:`coalora.nn.model.CoALoRAModel` for the calibration pass
(``calibration``)."""

# imported to register the built-in nf and int; llama.cpp's block types ("gguf") register on first use
from coalora.quant.families import blocked_codebook  # noqa: F401
