"""Run folders: ``results/runs/<id>/`` and what the kit's steps leave there.

``record`` (``run.json``: new_run, update_run, provenance), ``steps`` (reruns, replaced and
stale results), ``schema`` (every column and field of the files, and the doc page made from
them), ``read`` (reading run folders: ``read_run``, ``load_runs``) and ``checkpoints`` (which
base model and routers a step uses). May import ``files``, ``plots``, ``assets`` and
``mindskip``.
"""
