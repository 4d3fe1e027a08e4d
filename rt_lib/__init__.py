"""rt-kit: MindSkip routers and Router-Tuning for Llama-family Hugging Face causal LMs.

    from rt_lib import load_model, MindSkipConfig, get_mindskip_model
    model, tok = load_model("smollm2-135m-instruct")
    ms = get_mindskip_model(model, MindSkipConfig(num_routed_layers=8))
"""

__version__ = "0.1.0"

_LAZY = {
    "load_model": "rt_lib.assets",
    "load_dataset": "rt_lib.assets",
    "MindSkipConfig": "rt_lib.config",
    "get_mindskip_model": "rt_lib.mindskip",
    "MindSkipModel": "rt_lib.mindskip",
    "drop_sublayers": "rt_lib.mindskip",
}


def __getattr__(name):  # lazy: importing rt_lib must stay cheap (no torch import)
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rt_lib' has no attribute {name!r}")


__all__ = sorted(_LAZY)
