"""The evaluation step of a run (rt_lib.evaluation.sweep) and the checkpoint lookup of notebooks 02/03
(rt_lib.runs.checkpoints).

The bookkeeping of a threshold sweep (labels, static drop matched to each threshold's realised
layer count, file names, skip ratios, the base model left as it was) is checked with the
harness replaced by a stand-in that reports chosen skip ratios; one test runs the real
harness on the embedded tiny-random-llama.
"""

import json
import logging

import pandas as pd
import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaAttention

from rt_lib.evaluation import sweep
from rt_lib.runs import record as runs
from rt_lib.assets import loading as assets
from rt_lib.runs.checkpoints import DEFAULT_MODEL, Checkpoint, attach_routers, resolve_checkpoint
from rt_lib.mindskip.config import MindSkipConfig
from rt_lib.evaluation.results import MACRO, PAIRED_COLUMNS, RESULT_COLUMNS, SKIP_COLUMNS, EvalResults
from rt_lib.mindskip.model import MindSkipModel, get_mindskip_model
from tiny_models import tiny_model

TASKS = ["piqa", "rte"]
CALIBRATION = {"num_samples": 4, "max_length": 32}  # a few short calibration sequences: fast


@pytest.fixture(scope="module")
def tiny():
    """The embedded 4-layer tiny-random-llama and its tokenizer."""
    return assets.load_model("tiny-random-llama")


def save_routers(model, path, granularity="attn", seed=0):
    ms = get_mindskip_model(model, MindSkipConfig(routed_layers=[1, 2], granularity=granularity))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in ms.routers().values():
            r.weight.copy_(torch.randn(r.weight.shape, generator=g) * 40.0 / r.weight.shape[1] ** 0.5)
    ms.save_pretrained(path)
    ms.unload()
    return path


def removed_attention(model) -> list[int]:
    return [i for i, layer in enumerate(model.model.layers) if type(layer.self_attn) is not LlamaAttention]


def logits(model, tok):
    ids = tok("The quick brown fox jumps over the lazy dog", return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits


class FakeEvaluate:
    """Stands in for rt_lib.evaluation.driver.evaluate inside rt_lib.evaluation.sweep: a MindSkip model at
    threshold t realises the skip ratio ``skip[t]``; every call is recorded with what it saw."""

    def __init__(self, skip: dict[float, float]):
        self.skip, self.calls = skip, []

    def __call__(self, model, tok, *, variant, dense_reference, task_set, tasks, limit, batch_size, method=None, k=None):
        is_ms = isinstance(model, MindSkipModel)
        base = model.model if is_ms else model
        self.calls.append({"variant": variant, "mindskip": is_ms, "reference": dense_reference,
                           "threshold": model.config.threshold if is_ms else None,
                           "removed": removed_attention(base), "task_set": task_set, "limit": limit})
        labels = (["dense"] if is_ms and dense_reference is None else []) + [variant]
        rows, per_doc = [], {}
        for label in labels:
            routed = is_ms and label != "dense"
            ratio = self.skip[model.config.threshold] if routed else None
            for task in [*tasks, MACRO]:
                rows.append({"variant": label, "method": "dense" if label == "dense" else method or "mindskip",
                             "k": None if label == "dense" else k,
                             "task": task, "metric": "acc" if task != MACRO else "paper",
                             "value": 0.5, "stderr": 0.1, "n": 4, "num_fewshot": 0,
                             "threshold": model.config.threshold if routed else None, "skip_ratio": ratio})
            per_doc[label] = {t: {"keys": [[t, 0]], "prompt_hash": ["h"], "acc": [1.0]} for t in tasks}
        return EvalResults(task_set=task_set, table=pd.DataFrame(rows, columns=RESULT_COLUMNS).astype({"k": "Int64"}),
                           paired=pd.DataFrame(columns=PAIRED_COLUMNS), skip_stats=pd.DataFrame(columns=SKIP_COLUMNS),
                           per_doc=per_doc, tasks={t: {"limit": limit, "num_fewshot": 0, "metric": "acc"} for t in tasks},
                           provenance={"variant": variant, "num_layers": len(base.model.layers),
                                       "skip_ratio_of": "all layers"})


@pytest.fixture
def fake_evaluate(monkeypatch):
    def install(skip):
        fake = FakeEvaluate(skip)
        monkeypatch.setattr(sweep, "evaluate", fake)
        return fake
    return install


def run_sweep(tiny, run_dir, routers, thresholds, **kwargs):
    model, tok = tiny
    return sweep.evaluate_sweep(model, tok, run_dir, routers=routers, thresholds=thresholds, tasks=TASKS, limit=4,
                                batch_size=4, calibration=CALIBRATION, **kwargs)


# ------------------------------------------------------------------ bookkeeping (harness stand-in)
def test_static_drop_is_matched_to_each_distinct_realised_layer_count(tiny, tmp_path, fake_evaluate, caplog):
    model, tok = tiny
    routers = save_routers(model, tmp_path / "routers")
    before = logits(model, tok)
    # skip ratios of the model's 4 layers 0.25, 0.5, 0, 0.25 -> k = 1, 2, 0, 1
    fake = fake_evaluate({0.5: 0.25, 2.0: 0.5, 0.0: 0.0, 0.7: 0.25})
    with caplog.at_level(logging.WARNING, logger="rt_lib.evaluation.sweep"):
        res = run_sweep(tiny, tmp_path / "run", routers, [0.5, 2.0, 0.0, 0.7])
    assert "k=0 is the dense model, not run" in caplog.text
    assert [c["variant"] for c in fake.calls] == ["mindskip_t0.5", "mindskip_t2", "mindskip_t0", "mindskip_t0.7",
                                                  "static_drop_k1", "static_drop_k2"]
    ms_calls, drop_calls = fake.calls[:4], fake.calls[4:]
    assert [c["threshold"] for c in ms_calls] == [0.5, 2.0, 0.0, 0.7] and all(c["mindskip"] for c in ms_calls)
    # the first call runs the dense reference; every later variant is paired with that first result
    assert ms_calls[0]["reference"] is None
    assert all(c["reference"] is fake.calls[1]["reference"] is not None for c in fake.calls[1:])
    assert set(fake.calls[1]["reference"].table.variant) == {"dense", "mindskip_t0.5"}
    # static drop runs on the plain base model with its k least important attention sublayers removed,
    # the choice saved before it runs: the first matched count under the usual name, the others with k
    files = sorted(p.name for p in (tmp_path / "run" / "baselines").iterdir())
    assert files == ["static_drop.json", "static_drop_k2.json"]
    saved = {k: json.loads((tmp_path / "run" / "baselines" / name).read_text())
             for k, name in ((1, "static_drop.json"), (2, "static_drop_k2.json"))}
    for (k, drop), call in zip(saved.items(), drop_calls):
        assert drop["k"] == k and call["removed"] == drop["layers"] and not call["mindskip"]
    # importance scored once, on the calibration text (not "<given scores>"), for both choices
    assert saved[1]["scores"] == saved[2]["scores"]
    assert saved[1]["calibration"] == saved[2]["calibration"] and saved[2]["calibration"]["source"] != "<given scores>"
    # static drop's skip ratio: k / all 4 layers, on every row, MindSkip's definition; MindSkip's are its own
    t = res.table
    for variant, ratio in {"static_drop_k1": 0.25, "static_drop_k2": 0.5, "mindskip_t0.7": 0.25,
                           "mindskip_t0": 0.0}.items():
        assert (t[t.variant == variant].skip_ratio == ratio).all(), variant
    assert t[t.variant == "dense"].skip_ratio.isna().all()
    # written to the run folder, and the base model is left as it was (no routers, nothing removed)
    assert list(pd.read_csv(tmp_path / "run" / "eval" / "results.csv").columns) == RESULT_COLUMNS
    assert set(EvalResults.load(tmp_path / "run").table.variant) == set(t.variant)
    assert removed_attention(model) == [] and not any("mindskip" in n for n, _ in model.named_modules())
    assert torch.equal(logits(model, tok), before)


def test_one_threshold_keeps_the_plain_label_and_dense_scores_can_be_reused(tiny, tmp_path, fake_evaluate):
    model, tok = tiny
    routers = save_routers(model, tmp_path / "routers")
    fake = fake_evaluate({0.5: 0.5})  # 2 of the 4 layers
    first = run_sweep(tiny, tmp_path / "a", routers, [0.5], static_drop=False)
    assert set(first.table.variant) == {"dense", "mindskip"} and not (tmp_path / "a" / "baselines").exists()
    fake.calls.clear()
    again = run_sweep(tiny, tmp_path / "b", routers, [0.5], dense_from=tmp_path / "a")
    # no dense run: the first variant is already paired with a's dense scores
    assert [c["variant"] for c in fake.calls] == ["mindskip", "static_drop_k2"]
    reference = fake.calls[0]["reference"]
    assert reference is not None and set(reference.table.variant) == {"dense"}
    pd.testing.assert_frame_equal(again.table[again.table.variant == "dense"].reset_index(drop=True),
                                  first.table[first.table.variant == "dense"].reset_index(drop=True),
                                  check_dtype=False)  # read back from results.json: object columns


def test_routers_of_other_granularities_get_no_static_drop(tiny, tmp_path, fake_evaluate, caplog):
    model, _ = tiny
    routers = save_routers(model, tmp_path / "routers", granularity="mlp")
    fake = fake_evaluate({0.5: 0.5})
    with caplog.at_level(logging.WARNING, logger="rt_lib.evaluation.sweep"):
        res = run_sweep(tiny, tmp_path / "run", routers, [0.5])
    assert "these routers gate mlp sublayers" in caplog.text
    assert [c["variant"] for c in fake.calls] == ["mindskip"]
    assert set(res.table.variant) == {"dense", "mindskip"}
    assert not (tmp_path / "run" / "baselines").exists()
    assert res.table[(res.table.variant == "mindskip") & (res.table.task == MACRO)].skip_ratio.notna().all()


@pytest.mark.parametrize("thresholds", [[], None, ["0.5"], [0.5, None]])
def test_thresholds_must_be_a_non_empty_list_of_numbers(thresholds):
    with pytest.raises(ValueError, match="non-empty list of numbers"):
        sweep.check_thresholds(thresholds)


def test_fresh_default_routers_that_do_not_fit_fail_before_anything_is_written(tiny, tmp_path, fake_evaluate):
    fake = fake_evaluate({})
    with pytest.raises(ValueError, match="num_routed_layers=16 is too many"):
        run_sweep(tiny, tmp_path / "run", None, [0.5])
    assert fake.calls == [] and not (tmp_path / "run").exists()


def test_operating_points_map_variants_to_methods():
    table = pd.DataFrame([
        {"variant": "dense", "method": "dense", "task": MACRO, "value": 0.5, "threshold": None, "skip_ratio": None},
        {"variant": "mindskip_t0.5", "method": "mindskip", "task": MACRO, "value": 0.25, "threshold": 0.5,
         "skip_ratio": 0.4},
        {"variant": "static_drop_k3", "method": "static_drop", "k": 3, "task": MACRO, "value": 0.125,
         "threshold": None, "skip_ratio": 0.375},
        {"variant": "mindskip_t0.5", "method": "mindskip", "task": "piqa", "value": 1.0, "threshold": 0.5,
         "skip_ratio": 0.4},
    ])
    res = EvalResults("quick", table, None, None, {}, {}, {})
    points = sweep.operating_points(res)
    assert list(points.columns) == ["method", "accuracy", "skip_ratio", "threshold"]
    assert list(points.method) == ["dense", "mindskip", "static_drop"]
    assert list(points.accuracy) == [50.0, 25.0, 12.5]
    assert [sweep.mindskip_variant(0.5, 1), sweep.mindskip_variant(0.5, 3)] == ["mindskip", "mindskip_t0.5"]
    assert [sweep.static_drop_file(4, True), sweep.static_drop_file(4, False)] == ["static_drop.json",
                                                                                  "static_drop_k4.json"]


# ------------------------------------------------------------------ the real harness
@pytest.mark.slow
def test_sweep_through_the_harness_matches_static_drop_to_skipping_every_routed_layer(tiny, tmp_path):
    model, tok = tiny
    routers = save_routers(model, tmp_path / "routers")
    run_sweep(tiny, tmp_path / "a", routers, [0.5], static_drop=False)
    b = run_sweep(tiny, tmp_path / "b", routers, [0.0, 2.0], dense_from=tmp_path / "a")
    ra, rb = (pd.read_csv(tmp_path / run / "eval" / "results.csv") for run in ("a", "b"))
    dense_a, dense_b = (r[r.variant == "dense"].reset_index(drop=True) for r in (ra, rb))
    pd.testing.assert_frame_equal(dense_a, dense_b)  # copied, not re-run
    assert set(ra.variant) == {"dense", "mindskip"}
    macro = b.table[b.table.task == MACRO].set_index("variant")
    # threshold 0 keeps everything (skip 0, k = 0: no static drop), 2 skips both routed layers: 2 of
    # the model's 4 layers, the same skip ratio as the static drop of 2 layers
    assert set(macro.index) == {"dense", "mindskip_t0", "mindskip_t2", "static_drop_k2"}
    assert macro.loc["mindskip_t0", "skip_ratio"] == 0 and macro.loc["mindskip_t2", "skip_ratio"] == 0.5
    assert macro.loc["static_drop_k2", "skip_ratio"] == 0.5
    drop = json.loads((tmp_path / "b" / "baselines" / "static_drop.json").read_text())
    assert drop["k"] == 2
    if drop["layers"] == [1, 2]:  # the routed layers: removing them is what threshold 2 does
        assert macro.loc["static_drop_k2", "value"] == pytest.approx(macro.loc["mindskip_t2", "value"])
    paired = b.paired
    assert set(paired.variant) == {"mindskip_t0", "mindskip_t2", "static_drop_k2"}
    assert (paired[paired.variant == "mindskip_t0"]["diff"] == 0).all()


def test_fresh_routers_are_labelled_and_never_read_as_tuned_mindskip(tiny, tmp_path, fake_evaluate):
    from rt_lib.mindskip.config import MindSkipConfig
    from rt_lib.mindskip.model import get_mindskip_model

    model, tok = tiny
    fake = fake_evaluate({0.5: 0.0, 0.6: 0.0})
    ms = get_mindskip_model(model, MindSkipConfig(num_routed_layers=2))
    try:
        parts = sweep._mindskip_parts(ms, tok, [0.5, 0.6], None, dict(task_set="quick", tasks=TASKS, limit=4,
                                                                      batch_size=4), fresh=True)
    finally:
        ms.unload()
    assert [c["variant"] for c in fake.calls] == ["mindskip_fresh_t0.5", "mindskip_fresh_t0.6"]
    assert set(parts[0].table.method) | set(parts[1].table.method) == {"dense", "mindskip_fresh"}


# ------------------------------------------------------------------ checkpoint lookup
def test_checkpoint_lookup_order(tiny, tmp_path):
    model, _ = tiny
    run = runs.new_run(tmp_path, run_id="r", parameters={"train": {"model": "tuned-model"}})
    # nothing tuned yet: refused, unless fresh routers are asked for; the model notebook 01 tuned
    with pytest.raises(FileNotFoundError, match="no tuned routers.*fresh_routers=True"):
        resolve_checkpoint(run)
    ckpt = resolve_checkpoint(run, fresh_routers=True)
    assert ckpt == Checkpoint(run_dir=run, model="tuned-model", routers=None)
    assert "(none: fresh zero-init routers)" in str(ckpt)
    # the run's own routers once notebook 01 wrote them; an explicit model wins
    save_routers(model, run / "train" / "routers")
    assert resolve_checkpoint(str(run)).routers == run / "train" / "routers"
    assert resolve_checkpoint(run, model="other").model == "other"
    # another run's routers: their base model when the run tuned none, else the default
    bare = runs.new_run(tmp_path, run_id="bare")
    assert resolve_checkpoint(bare, routers=str(run / "train" / "routers")).model == "tiny-random-llama"
    assert resolve_checkpoint(bare, fresh_routers=True) == Checkpoint(run_dir=bare, model=DEFAULT_MODEL, routers=None)
    # a routers folder that is named but missing is an error, never fresh routers
    with pytest.raises(FileNotFoundError, match="routers='nowhere/routers' does not exist"):
        resolve_checkpoint(bare, routers="nowhere/routers")


def test_checkpoint_without_run_folder_makes_a_new_run(tmp_path, monkeypatch):
    made, real_new_run = [], runs.new_run

    def new_run(preset=None, **kwargs):  # the default root would be the kit's results/runs
        made.append(preset)
        return real_new_run(tmp_path, run_id="new", preset=preset)

    monkeypatch.setattr(runs, "new_run", new_run)
    ckpt = resolve_checkpoint("", preset="smoke", fresh_routers=True)
    assert made == ["smoke"] and ckpt.run_dir == tmp_path / "new" and ckpt.routers is None


def test_attach_routers_refuses_routers_of_another_model(tiny, tmp_path):
    model, _ = tiny
    routers = save_routers(model, tmp_path / "routers")
    ms = attach_routers(model, routers)
    assert ms.routed_layers == [1, 2]
    ms.unload()
    with pytest.raises(ValueError, match="does not fit"):
        attach_routers(tiny_model("llama"), routers)
