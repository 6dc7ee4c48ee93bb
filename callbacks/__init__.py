"""Lightning callbacks for coalora runs (use as ``class_path: callbacks.ParetoConfigSearch``)."""

from callbacks.pareto_search import ParetoConfigSearch

__all__ = ["ParetoConfigSearch"]
