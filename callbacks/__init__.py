"""Lightning callbacks for coalora runs (use as ``class_path: callbacks.ParetoConfigSearch``)."""

from callbacks.adapter_warm_start import AdapterWarmStart
from callbacks.pareto_search import ParetoConfigSearch

__all__ = ["AdapterWarmStart", "ParetoConfigSearch"]
