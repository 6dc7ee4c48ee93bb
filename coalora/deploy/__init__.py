"""Deployment: the artifact's files and in-memory form (``layout``), byte sizes (``sizes``), building one
from a task (``artifact``), writing folders atomically (``files``), reading them back (``reader``), the
loaded model with ``predict`` (``loaded``), which configurations a checkpoint serves (``resolve``), one
export (``export``), in-process switching (``adaptive``) and the PEFT export (``peft_export``). May import
every room but ``commands`` and ``cli``; it takes tasks by the base-class type."""

from coalora.deploy.adaptive import AdaptiveModel
from coalora.deploy.loaded import DeployedModel, load

__all__ = ["AdaptiveModel", "DeployedModel", "load"]
