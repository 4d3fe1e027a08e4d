"""The paper's tables, figures and claims, rebuilt from result files only (no model runs).

``tidy`` (the runs as one table), ``tables`` (the paper's tables with the kit's rows),
``claims`` (claims decided from an evidence run), ``evidence_plots`` and ``figures`` (the
figures) and ``build`` (``build_paper``: everything into ``results/``). May import every
package before it in ``rt_lib.LAYERS`` (in practice ``files``, ``plots``, ``runs`` and
``evaluation``).
"""
