"""The whole reproduction: the notebook pipeline, the plan of a preset, ``make reproduce``.

``notebooks`` (execute notebooks 01-04 with papermill into one run folder) and ``plan`` with
``plan_assets``, ``plan_memory`` and ``plan_report`` (what a preset will need before any
weights are loaded); ``make reproduce`` runs ``python -m rt_lib reproduce`` (``rt_lib.cli.reproduce``,
the pipeline with its plan). May import every package before it in ``rt_lib.LAYERS``; never ``cli``.
"""
