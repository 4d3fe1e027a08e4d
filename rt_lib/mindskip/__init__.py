"""MindSkip, the model core: routers that gate the sublayers of a Hugging Face decoder.

``config`` (``MindSkipConfig``), ``architecture`` (where a decoder's layers are and what
may be routed), ``moe`` (sparse mixture-of-experts blocks, their expert routers and what
reaches them), ``gates`` (the gates and their routing context), ``removal`` (physically
removed sublayers), ``checkpoint`` (router checkpoint files, metadata, digests), ``model``
(``get_mindskip_model``, ``MindSkipModel``, saving and loading routers) and ``generation``
(dense and routed generations side by side). May import ``rt_lib.files`` only: nothing about runs, tuning or evaluation.
"""
