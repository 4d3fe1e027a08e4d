"""Shared test setup: no network, one embedded model per session, a `slow` marker.

Tests never reach the Hugging Face hub: the offline flags are set before transformers or
datasets are imported. The embedded model is converted once into the user's rt-kit cache
(``$RT_KIT_CACHE``, about 20 s the first time) and loaded once per session.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds (deselect with -m 'not slow')")


@pytest.fixture(scope="session")
def embedded_model():
    """``(model, tokenizer)`` of the embedded SmolLM2-135M-Instruct, float32, CPU, eval mode.

    Shared by all tests: do not modify it in place (wrap a copy, or restore what you change).
    """
    from rt_lib.assets.loading import load_model

    return load_model("smollm2-135m-instruct")
