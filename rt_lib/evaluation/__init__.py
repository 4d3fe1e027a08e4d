"""Evaluation with lm-evaluation-harness: dense and MindSkip models on the paper's tasks.

``harness`` (the ``mindskip`` harness model ``MindSkipLM``), ``tasks`` (the kit's offline
harness tasks), ``driver`` (``evaluate``), ``results`` (``EvalResults`` and its files),
``tables`` (results and paired tables), ``stats`` (paired statistics), ``measures`` (paired
measures beside accuracy) and ``sweep`` (the evaluation step of a run). May import ``files``,
``plots``, ``assets``, ``mindskip``, ``runs`` and ``tuning``.
"""
