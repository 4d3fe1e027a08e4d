"""Router-Tuning: train MindSkip routers on a frozen model, and the baselines that share it.

``config`` (``TrainConfig`` and the training recipes in ``recipes/``), ``data`` (tuning text to
token sequences), ``heldout`` (the held-out LM loss), ``trainer_state`` (checkpoints that never
run code), ``tuner`` (one run: setup, step, finish), ``train`` (``train_routers``), ``router_study``
(the router recipe study: the cpu recipe with overrides) and ``baselines`` (static attention drop, full-parameter and LoRA tuning).
May import ``files``, ``plots``, ``assets``, ``mindskip`` and ``runs``.
"""
