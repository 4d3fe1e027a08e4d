"""rt-kit: MindSkip routers and Router-Tuning for Llama-family Hugging Face causal LMs.

    from rt_lib import load_model, MindSkipConfig, get_mindskip_model
    model, tok = load_model("smollm2-135m-instruct")
    ms = get_mindskip_model(model, MindSkipConfig(num_routed_layers=8))

The package is layered by job, in data-flow order (``LAYERS``, first to last); a package or leaf
module imports only from itself and from the ones before it, never from one after it, and no
module imports another's private (underscore) names (``tests/test_layers.py`` checks every
import, at module level or inside a function):

``files``       file primitives: atomic writes, digests, locks (imports nothing of the kit)
``plots``       figure style and plot functions over plain data
``assets``      asset packages, models, benchmark data, GGUF files, the asset cache
``mindskip``    the model core: config, architecture, gates, removal, the MindSkip model
``runs``        run folders: run.json records, steps, schema, reading folders, checkpoints
``tuning``      Router-Tuning: train config and recipes, data, the tuner, trainer state, held-out
                loss, the training loop, the router study, the baselines
``evaluation``  lm-evaluation-harness: harness model, tasks, driver, results, tables,
                measures, paired statistics, the threshold sweep
``speed``       profiling: settings, variants, timing, roofline, batching, the profile step
``evidence``    the evidence run
``paper``       the paper's tables, figures and claims from result files
``pipeline``    the notebook pipeline, the plan of a preset, ``make reproduce``
``cli``         the command line, ``python -m rt_lib <command>`` (only ``__main__`` above it)

The package root imports nothing (the names below load lazily).
"""

__version__ = "0.1.0"

LAYERS = ("files", "plots", "assets", "mindskip", "runs", "tuning", "evaluation", "speed", "evidence",
          "paper", "pipeline", "cli")

_LAZY = {
    "load_model": "rt_lib.assets.loading",
    "load_dataset": "rt_lib.assets.loading",
    "MindSkipConfig": "rt_lib.mindskip.config",
    "get_mindskip_model": "rt_lib.mindskip.model",
    "MindSkipModel": "rt_lib.mindskip.model",
    "drop_sublayers": "rt_lib.mindskip.removal",
}


def __getattr__(name):  # lazy: importing rt_lib must stay cheap (no torch import)
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rt_lib' has no attribute {name!r}")


__all__ = sorted(_LAZY)
