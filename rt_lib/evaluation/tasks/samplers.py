"""Few-shot example selection that depends only on the scored document and the seed.

The harness's default sampler draws from one ``random.Random(seed)`` stream that advances
document by document in the order a process builds its requests. The examples a document
gets therefore depend on how many documents the same process saw before it: with
``accelerate launch`` (documents dealt round-robin to N processes) or a different ``limit``
or ``samples`` selection, the same document is shown different examples, and scores move.
The paper's authors patched their harness fork to select by sample index for this reason
(docs/method.md, evaluation settings).

``DocSeededSampler`` derives a fresh generator from ``(fewshot seed, fingerprint of the
scored document)`` for every document, so its examples are the same in any process layout,
batch size, limit or order. It is used by the kit's offline task YAMLs
(``fewshot_config.sampler``) and by ``rt_lib.evaluation.driver`` for the standard tasks.
"""

from __future__ import annotations

import hashlib
import json
from random import Random
from typing import Any

from lm_eval.api.samplers import ContextSampler


def doc_fingerprint(doc: Any) -> str:
    """A stable text key of a document (same across processes and Python hash seeds)."""
    text = json.dumps(doc, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class DocSeededSampler(ContextSampler):
    """Draws ``n`` examples with ``Random(f"{seed}|{doc_fingerprint(doc)}")``.

    The scored document is never among its own examples (the harness passes it as
    ``eval_doc`` when few-shot and scored documents share a split). When the harness does
    not pass it (few-shot examples from another split), the task wrapper in
    ``rt_lib.evaluation.driver`` sets ``current_doc`` before each prompt is built; without either,
    the sampler refuses rather than silently falling back to the order-dependent stream.
    """

    def __init__(self, df=None, *, rnd: int | None = None, fewshot_indices=None, **kwargs):
        super().__init__(df, rnd=rnd, fewshot_indices=fewshot_indices, **kwargs)
        self.seed = rnd
        self.current_doc: dict | None = None

    def set_rnd(self, rnd: int | None):
        self.seed = rnd
        return super().set_rnd(rnd)

    def sample(self, n: int, eval_doc=None, df=None, **kwargs):
        if n < 0:
            raise ValueError(f"number of few-shot examples must be >= 0, got {n}")
        if n == 0:
            return []
        if df:
            self.df = df
        key_doc = eval_doc if eval_doc is not None else self.current_doc
        if key_doc is None:
            raise RuntimeError(
                "DocSeededSampler needs the scored document: use it through rt_lib.evaluation.driver "
                "or with fewshot_split equal to the scored split"
            )
        pool = self.fewshot_docs()
        rng = Random(f"{self.seed}|{doc_fingerprint(key_doc)}")
        # Draw one spare index per copy of eval_doc we might have to drop; a pool holding the
        # scored document several times is handled by the exact fallback below.
        k = min(len(pool), n + (1 if eval_doc is not None else 0))
        picked = [pool[i] for i in rng.sample(range(len(pool)), k)]
        if eval_doc is not None:
            picked = [d for d in picked if d != eval_doc]
        if len(picked) < n:
            rest = [d for d in pool if d != eval_doc] if eval_doc is not None else list(pool)
            if len(rest) < n:
                raise ValueError(
                    f"{n} few-shot examples requested but the pool holds only {len(rest)} "
                    "documents besides the scored one"
                )
            picked = rng.sample(rest, n)
        return picked[:n]
