"""Evaluation across configurations: one configuration's metrics (``results``), the hypervolume of
(metric, bits) points (``hypervolume``), and the summary, table, JSON/CSV and plot (``report``). May import
:mod:`coalora.quant`, :mod:`coalora.data` and the helpers; it takes a task, never imports one."""
