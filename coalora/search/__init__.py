"""The Pareto configuration search (SPEC §5) without Lightning: the archive (``archive``), Pareto utilities
and hypervolume (``pareto``), the GP and qLogEHVI (``surrogate``) and new candidates (``candidates``). The
Lightning callback that runs it between epochs is ``callbacks.ParetoConfigSearch`` at the repository top
level. May import :mod:`coalora.quant` and the helpers."""
