"""Deployment: the artifact's files and in-memory form (``layout``), byte sizes (``sizes``), building one
from a task (``artifact``), writing folders atomically (``files``), reading them back (``reader``), the
loaded model with ``predict`` (``loaded``), which configurations a checkpoint serves (``resolve``), one
export (``export``), in-process switching (``adaptive``) and the PEFT export (``peft_export``). May import
every room but ``commands`` and ``cli``; it takes tasks by the base-class type.

Serving an artifact (``reader``, ``loaded`` and what they import) must not import the training stack
(Lightning, torchmetrics, the GP search, scipy, matplotlib): tests/test_lean_imports.py holds it to that.
The names below are therefore resolved on first use (PEP 562), so ``coalora.deploy.DeployedModel`` does
not pull in ``AdaptiveModel``'s checkpoint loading, which needs the tasks and Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from coalora.deploy.adaptive import AdaptiveModel
    from coalora.deploy.loaded import DeployedModel, load

__all__ = ["AdaptiveModel", "DeployedModel", "load"]

#: public name -> the submodule that defines it, imported when the name is first read
_LAZY = {
    "AdaptiveModel": "coalora.deploy.adaptive",
    "DeployedModel": "coalora.deploy.loaded",
    "load": "coalora.deploy.loaded",
}


def __getattr__(name: str) -> Any:
    """Import a public name's submodule on first access, not on ``import coalora.deploy``."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'coalora.deploy' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
