"""Tasks: the LightningModules. :class:`CoALoRATask` (``base.py``) owns the configuration sets, sampling, the
quantized-weight cache and checkpoints; one subclass per task owns the backbone's Auto class, the loss and
the metrics (``classification.py`` for GLUE, ``causal_lm.py`` for decoder LMs). ``methods.py`` is the table
of what each method trains and serves; ``checkpoint.py`` is the one checkpoint reader and
``configurations.py`` a task's configuration sets; ``seeding.py`` reseeds dropout per training batch.
May import quant, nn and data (never search, eval or deploy) and the helpers (utils, errors, pretrained)."""

from coalora.tasks.base import TASK_TYPES, CoALoRATask
from coalora.tasks.causal_lm import CausalLMTask
from coalora.tasks.classification import ClassificationTask
from coalora.tasks.methods import METHODS, Method, MethodSpec

__all__ = [
    "METHODS",
    "TASK_TYPES",
    "CausalLMTask",
    "ClassificationTask",
    "CoALoRATask",
    "Method",
    "MethodSpec",
]
