"""Speed and KV-cache memory of MindSkip beside the oracle and an analytic bound.

``variants`` (the model states timed), ``timing`` (the timing primitives), ``roofline``
(the analytic cost and memory estimate), ``profiling`` (``ProfileSettings``, its named grids and
``profile`` over a grid), ``batching`` (batching
under sequence routing) and ``step`` (the profiling step of a run folder). May import
``files``, ``plots``, ``assets``, ``mindskip``, ``runs``, ``tuning`` and ``evaluation``.
"""
