"""Document adapters for offline task YAMLs: embedded data -> the fields the standard task reads."""

from __future__ import annotations


def boolq_to_super_glue(dataset):
    """google/boolq rows (question, passage, answer: bool) -> super_glue/boolq's ``label`` (0 no, 1 yes).

    The harness's ``boolq`` task reads aps/super_glue; the embedded copy is google/boolq, the
    same 3270 validation questions and passages with the answer as a boolean.
    """

    def _label(doc):
        return {"label": int(bool(doc["answer"]))}

    return dataset.map(_label)
