"""Studies that decide the paper's claims on the embedded model: the evidence run (``run``: every
variant on the same task documents and held-out blocks at the paper's operating points) and the
frontier of held-out loss against skipped layers (``frontier``: router recipes against static
drops, at equal realised skip), and the threshold calibration both use (``calibration``). May import ``files``, ``plots``, ``assets``, ``mindskip``,
``runs``, ``tuning``, ``evaluation`` and ``speed``.
"""
