"""Evaluation through lm-evaluation-harness: the adapter (rt_lib.evaluation.harness), the driver
(rt_lib.evaluation.driver) and its results (rt_lib.evaluation.results).

Tiny random Llamas with the embedded SmolLM2 tokenizer, a few documents per task: what is
asserted is identity with the harness (scores, prompts), invariance (batch size, process
layout) and the bookkeeping (paired differences, skip counts, files, errors).
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM

import lm_eval
from lm_eval import simple_evaluate
from lm_eval.api.registry import get_model
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks._yaml_loader import load_yaml
from lm_eval.utils import apply_template

from rt_lib.assets import loading as assets
from rt_lib.assets import benchmarks as benchmark_data
from rt_lib.mindskip.config import MindSkipConfig
from rt_lib.evaluation.results import PAIRED_COLUMNS, RESULT_COLUMNS, SKIP_COLUMNS, EvalResults
from rt_lib.evaluation.driver import evaluate
from rt_lib.cli.evaluate import main
from rt_lib.evaluation.harness import MindSkipLM, task_manager
from rt_lib.mindskip.model import get_mindskip_model
from rt_lib.evaluation.tasks import PAPER_TASKS, harness_tasks_dir
from rt_lib.evaluation.tasks.samplers import DocSeededSampler

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return assets.load_model("tiny-random-llama")[1]


def tiny_llama(tok, seed=0, hidden=32, layers=4):
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def routed(model, layers=(1, 2), seed=0, scale=40.0):
    """MindSkip on `layers` with random router weights, so sequences disagree on what to skip."""
    ms = get_mindskip_model(model, MindSkipConfig(routed_layers=list(layers)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in ms.routers().values():
            r.weight.copy_(torch.randn(r.weight.shape, generator=g) * scale / r.weight.shape[1] ** 0.5)
    return ms


@pytest.fixture(scope="module")
def tm():
    return task_manager(offline=True)


def run(lm, tm, tasks, limit, num_fewshot=None):
    return simple_evaluate(model=lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot, task_manager=tm,
                           log_samples=True, bootstrap_iters=0, fewshot_random_seed=1234)


def loglikelihoods(res, task):
    return {s["doc_id"]: [r[0][0] for r in s["resps"]] for s in res["samples"][task]}


# ------------------------------------------------------------------ identity with HFLM
@pytest.mark.slow
def test_dense_model_scores_exactly_as_plain_hflm(tok, tm):
    """One forward per request (routing_input="context+continuation") is HFLM's computation; the
    default shared-context scoring is compared with HFLM in tests/test_shared_context.py."""
    model = tiny_llama(tok)
    ours = MindSkipLM(pretrained=model, tokenizer=tok, batch_size=3, routing_input="context+continuation")
    theirs = HFLM(pretrained=model, tokenizer=tok, batch_size=3)
    a = run(ours, tm, ["piqa_offline", "arc_challenge_offline"], limit=5, num_fewshot=2)
    b = run(theirs, tm, ["piqa_offline", "arc_challenge_offline"], limit=5, num_fewshot=2)
    for task in ("piqa_offline", "arc_challenge_offline"):
        assert loglikelihoods(a, task) == loglikelihoods(b, task)  # bit-identical
        assert [s["prompt_hash"] for s in a["samples"][task]] == [s["prompt_hash"] for s in b["samples"][task]]
        assert a["results"][task]["acc_norm,none"] == b["results"][task]["acc_norm,none"]


def test_harness_registry_and_loading_by_name(tok, tm, tmp_path):
    assert get_model("mindskip") is MindSkipLM
    model, _ = assets.load_model("tiny-random-llama")
    routed(model, layers=(1, 2)).save_pretrained(tmp_path / "routers")
    res = simple_evaluate(model="mindskip", model_args=f"pretrained=tiny-random-llama,routers={tmp_path / 'routers'},threshold=0.4",
                          tasks=["rte_offline"], limit=3, task_manager=tm, log_samples=False, bootstrap_iters=0)
    info = res["config"]["mindskip"]
    assert info["threshold"] == 0.4 and info["routed_layers"] == [1, 2]
    assert len(info["routers_sha256"]) == 64
    assert set(info["executed_fraction"]["rte_offline"]) == {1, 2}
    assert res["n-samples"]["rte_offline"]["effective"] == 3


# ------------------------------------------------------------------ prompts = standard prompts
def _standard(field, doc):
    """Render a field of a standard harness task config the way ConfigurableTask does."""
    if callable(field):
        return field(doc)
    if isinstance(field, list):
        return field
    if field in doc:
        return doc[field]
    out = apply_template(field, doc)
    return out


def _norm_choice(c):
    return ast.literal_eval(c) if isinstance(c, str) else c


def _norm_target(t):
    return int(t) if isinstance(t, str) and t.isdigit() else t


def _standard_docs(name, raw):
    """The standard task's document for each embedded row (its own process_docs, boolq's schema)."""
    spec = PAPER_TASKS[name]
    cfg = load_yaml(harness_tasks_dir() / spec.harness_yaml)
    if name == "boolq":  # super_glue/boolq has label (0 no, 1 yes) where google/boolq has answer
        raw = raw.map(lambda d: {"label": 1 if d["answer"] else 0})
    if "process_docs" in cfg:
        raw = cfg["process_docs"](raw)
    return cfg, raw


@pytest.mark.parametrize("name", [t for t in PAPER_TASKS if t != "mmlu"])
def test_offline_prompts_equal_standard_prompts(name, tm):
    spec = PAPER_TASKS[name]
    task = tm.load([spec.offline_name])["tasks"][spec.offline_name]
    # an in-memory copy: map() on the on-disk dataset would write cache files into the data folder
    raw = Dataset.from_list(assets.load_dataset(spec.benchmark, split="validation").select(range(4)).to_list())
    cfg, std_docs = _standard_docs(name, raw)
    for i in range(4):
        doc, std = task.eval_docs[i], std_docs[i]
        assert task.doc_to_text(doc) == _standard(cfg["doc_to_text"], std)
        assert task.doc_to_choice(doc) == _norm_choice(_standard(cfg["doc_to_choice"], std))
        assert task.doc_to_target(doc) == _norm_target(_standard(cfg["doc_to_target"], std))
    assert task.config.num_fewshot == spec.shots
    assert [m["metric"] for m in task.config.metric_list] == [m["metric"] for m in cfg["metric_list"]]


def test_offline_mmlu_is_the_standard_task_with_dev_examples(tm):
    loaded = tm.load(["mmlu_offline"])
    assert len(loaded["tasks"]) == 57
    task = loaded["tasks"]["mmlu_offline_anatomy"]
    task.set_fewshot_seed(1234)
    cfg = load_yaml(harness_tasks_dir() / "mmlu/default/mmlu_anatomy.yaml")
    test = assets.load_dataset("mmlu", split="test", subset="anatomy")
    dev = assets.load_dataset("mmlu", split="dev", subset="anatomy")
    letters = cfg["doc_to_choice"]

    def qa(d):
        return apply_template(cfg["doc_to_text"], d)

    shots = "".join(f"{qa(d)} {letters[d['answer']]}\n\n" for d in dev.select(range(5)))
    expected = cfg["description"] + shots + qa(test[3])
    assert task.fewshot_context(task.eval_docs[3], num_fewshot=5) == expected
    assert len(task.eval_docs) == len(test)  # test scored, as in the standard task


# ------------------------------------------------------------------ few-shot selection
def _contexts(task, limit, world_size):
    out = {}
    for rank in range(world_size):
        task.build_all_requests(limit=limit, rank=rank, world_size=world_size)
        for inst in task.instances:
            out.setdefault(inst.doc_id, inst.arguments[0])
    return out


def test_fewshot_examples_do_not_depend_on_process_layout_or_limit(tm):
    task = tm.load(["arc_challenge_offline"])["tasks"]["arc_challenge_offline"]
    assert isinstance(task.sampler, DocSeededSampler)
    task.set_config(key="num_fewshot", value=3)
    task.set_fewshot_seed(1234)
    one = _contexts(task, 8, 1)
    assert _contexts(task, 8, 2) == one == _contexts(task, 8, 3)
    assert {k: v for k, v in _contexts(task, 4, 1).items()} == {k: one[k] for k in range(4)}
    for doc_id in range(8):  # the scored question is never its own example
        question = task.doc_to_text(task.eval_docs[doc_id])
        assert one[doc_id].count(question) == 1 and one[doc_id].endswith(question)
    task.set_fewshot_seed(7)
    assert _contexts(task, 8, 1) != one  # the seed matters
    task.set_fewshot_seed(1234)
    assert _contexts(task, 8, 1) == one


def test_standard_tasks_get_per_document_examples_from_another_split(tm, tmp_path):
    """The paper task set's path: examples from a train split (the harness passes no eval_doc)."""
    from lm_eval.api.samplers import ContextSampler

    from rt_lib.evaluation.harness import seed_fewshot_per_document

    files = [str(f) for f in benchmark_data.benchmark_files("arc_challenge")]
    cfg = {"include": str(harness_tasks_dir() / "arc/arc_challenge.yaml"), "task": "arc_two_splits",
           "dataset_path": "arrow", "dataset_name": None,
           "dataset_kwargs": {"data_files": {"test": files, "train": files}}, "validation_split": None}
    import yaml

    (tmp_path / "arc_two_splits.yaml").write_text(yaml.safe_dump(cfg))
    task = tm.load([str(tmp_path / "arc_two_splits.yaml")])["tasks"]["arc_two_splits"]
    assert type(task.sampler) is ContextSampler  # the harness's order-dependent stream
    seed_fewshot_per_document(task)
    assert isinstance(task.sampler, DocSeededSampler)
    task.set_config(key="num_fewshot", value=2)
    task.set_fewshot_seed(1234)
    one = _contexts(task, 6, 1)
    assert _contexts(task, 6, 2) == one and len(set(one.values())) == 6


def test_sampler_refuses_without_the_scored_document():
    s = DocSeededSampler([{"q": i} for i in range(10)], rnd=3)
    with pytest.raises(RuntimeError, match="scored document"):
        s.sample(2)
    s.current_doc = {"q": 4}
    a = s.sample(3)
    assert s.sample(3) == a and len(a) == 3
    assert s.sample(3, eval_doc={"q": 4}) == s.sample(3, eval_doc={"q": 4})
    assert {"q": 4} not in s.sample(9, eval_doc={"q": 4})


# ------------------------------------------------------------------ batch-size invariance
@pytest.mark.slow
@pytest.mark.parametrize("routers", [False, True], ids=["dense", "mindskip"])
def test_scores_do_not_change_with_batch_size(tok, tm, routers):
    model = tiny_llama(tok, seed=1)
    target = routed(model) if routers else model
    per_bs = {}
    for bs in (1, 4):
        lm = MindSkipLM(pretrained=target, tokenizer=tok, batch_size=bs)
        res = run(lm, tm, ["piqa_offline", "arc_challenge_offline"], limit=6)
        per_bs[bs] = (res, {t: lm.capacities([t]) for t in lm.skip_counts})
    (a, sa), (b, sb) = per_bs[1], per_bs[4]
    for task in ("piqa_offline", "arc_challenge_offline"):
        la, lb = loglikelihoods(a, task), loglikelihoods(b, task)
        assert la.keys() == lb.keys()
        for k in la:
            assert la[k] == pytest.approx(lb[k], abs=1e-4)
        for m in ("acc", "acc_norm"):
            assert [s[m] for s in a["samples"][task]] == [s[m] for s in b["samples"][task]]
    assert sa == sb
    if routers:  # the routers really split the documents, so invariance is not vacuous
        fracs = [f for t in sa.values() for f in t.values()]
        assert any(0 < f < 1 for f in fracs)


# ------------------------------------------------------------------ evaluate(): tables and files
@pytest.fixture(scope="module")
def quick_run(tok, tmp_path_factory):
    model = tiny_llama(tok, seed=2)
    ms = routed(model, layers=(1, 2), seed=3)
    ms.force({1: False})  # layer 1 skipped for every input, layer 2 routed
    out = tmp_path_factory.mktemp("run") / "tiny-quick"
    res = evaluate(ms, tok, task_set="quick", tasks=["piqa", "rte"], limit=8, batch_size=4, out_dir=out)
    return res, out, ms


@pytest.mark.slow
def test_evaluate_tables_paired_and_skip_stats(quick_run):
    res, _, ms = quick_run
    t = res.table
    assert set(t.variant) == {"dense", "mindskip"}
    assert list(t.columns) == RESULT_COLUMNS
    assert set(t.task) == {"piqa", "rte", "macro_avg"}
    for variant in ("dense", "mindskip"):
        d = res.doc_scores(variant, "piqa", "acc_norm")
        row = t[(t.variant == variant) & (t.task == "piqa") & (t.metric == "acc_norm")].iloc[0]
        assert row.value == pytest.approx(sum(d.values()) / len(d)) and row.n == 8
    # paired difference recomputed from the per-document scores
    v, r = res.doc_scores("mindskip", "rte", "acc"), res.doc_scores("dense", "rte", "acc")
    p = res.paired[(res.paired.task == "rte") & (res.paired.metric == "acc")].iloc[0]
    assert p["diff"] == pytest.approx(sum(v[k] - r[k] for k in v) / 8)
    assert p.ci_low <= p["diff"] <= p.ci_high and p.n == 8
    macro = res.paired[res.paired.task == "macro_avg"].iloc[0]
    piqa = res.paired[(res.paired.task == "piqa") & (res.paired.metric == "acc_norm")].iloc[0]
    assert macro["diff"] == pytest.approx((piqa["diff"] + p["diff"]) / 2)  # paper metrics: acc_norm, acc
    # skip statistics: layer 1 forced off, layer 2 routed; the user's forcing is restored
    s = res.skip_stats
    assert set(s.layer) == {1, 2}
    assert (s[s.layer == 1].executed_fraction == 0).all()
    assert ms.gates[1].forced is False and ms.gates[2].forced is None
    mrow = t[(t.variant == "mindskip") & (t.task == "piqa")].iloc[0]
    exec2 = s[(s.task == "piqa") & (s.layer == 2)].executed_fraction.iloc[0]
    # the paper's skip ratio: layer 1 always skipped, layer 2 sometimes, of the model's 4 layers
    assert mrow.skip_ratio == pytest.approx((1 + (1 - exec2)) / 4)
    assert res.provenance["num_layers"] == 4 and res.provenance["skip_ratio_of"] == "all layers"


def test_static_drop_and_mindskip_skip_ratios_share_one_definition(tok):
    """results.csv's skip ratio is of all the model's layers for both methods: MindSkip skipping
    both its routed layers on every input and a static drop of two layers are 2 of 4 layers; a
    static drop's k counts against every layer, not against the routed ones."""
    from rt_lib.mindskip.removal import drop_sublayers

    model = tiny_llama(tok, seed=4)
    ms = routed(model, layers=(1, 2))
    ms.force({1: False, 2: False})
    common = dict(task_set="quick", tasks=["rte"], limit=3, batch_size=4, dense_reference=False)
    a = evaluate(ms, tok, **common)
    ms.unload()
    drop = drop_sublayers(model, [1, 2])
    try:
        b = evaluate(model, tok, variant="static_drop_k2", method="static_drop", k=2, **common)
    finally:
        drop.restore()
    drop3 = drop_sublayers(model, [1, 2, 3])
    try:
        c = evaluate(model, tok, variant="static_drop_k3", method="static_drop", k=3, **common)
    finally:
        drop3.restore()
    assert (a.table[a.table.variant == "mindskip"].skip_ratio == 0.5).all()
    assert (b.table[b.table.variant == "static_drop_k2"].skip_ratio == 0.5).all()
    assert (c.table[c.table.variant == "static_drop_k3"].skip_ratio == 0.75).all()  # more layers than are routed
    assert a.provenance["num_layers"] == b.provenance["num_layers"] == 4


def test_skip_ratios_written_of_the_routed_layers_are_read_of_all_layers():
    """Files written when results.csv's skip ratio was of the routed layers (static drop: k /
    routed layers): read back of all layers; without the model's layer count, left empty."""
    import math

    import pandas as pd

    from rt_lib.runs.read import SKIP_RATIO_OF, skip_ratio_of_all_layers

    old = pd.DataFrame({"variant": ["dense", "mindskip", "static_drop_k8", "static_drop"],
                        "method": ["dense", "mindskip", "static_drop", None], "k": [None, None, 8, None],
                        "skip_ratio": [None, 0.5, None, 0.25]})
    new = skip_ratio_of_all_layers(old, None, num_layers=30, n_routed=16)
    assert math.isnan(new.skip_ratio[0])
    assert new.skip_ratio[1] == pytest.approx(8 / 30)  # half of 16 routed layers = 8 of 30
    assert new.skip_ratio[2] == pytest.approx(8 / 30)  # k / all layers, where k is known
    assert new.skip_ratio[3] == pytest.approx(4 / 30)  # 0.25 of 16 routed layers
    assert skip_ratio_of_all_layers(old, None, num_layers=None, n_routed=16).skip_ratio.isna().all()
    assert skip_ratio_of_all_layers(old, SKIP_RATIO_OF, None, None) is old  # written in the current unit


def test_dense_reference_forced_keep_is_the_base_model(tok, tm, quick_run):
    res, _, _ = quick_run
    base = tiny_llama(tok, seed=2)
    plain = run(HFLM(pretrained=base, tokenizer=tok, batch_size=4), tm, ["rte_offline"], limit=8, num_fewshot=0)
    expect = {("rte_offline", s["doc_id"]): s["acc"] for s in plain["samples"]["rte_offline"]}
    assert res.doc_scores("dense", "rte", "acc") == expect


def test_result_files_follow_the_format(quick_run):
    res, out, _ = quick_run
    import pandas as pd

    assert list(pd.read_csv(out / "eval" / "results.csv").columns) == RESULT_COLUMNS
    assert list(pd.read_csv(out / "eval" / "paired.csv").columns) == PAIRED_COLUMNS
    assert list(pd.read_csv(out / "eval" / "skip_stats.csv").columns) == SKIP_COLUMNS
    j = json.loads((out / "eval" / "results.json").read_text())
    prov = j["provenance"]
    assert j["task_set"] == "quick" and "preset" not in j
    for key in ("model", "task_set", "harness_version", "seeds", "batch_size", "git_revision", "fewshot_source", "versions"):
        assert key in prov, key
    assert prov["harness_version"] == lm_eval.__version__ and prov["batch_size"] == 4
    assert len(prov["mindskip"]["router_weights_sha256"]) == 64
    assert prov["mindskip"]["forced"] == {"1": False, "2": None}
    assert j["tasks"]["piqa"]["fewshot_source"] == "none (0-shot)" and j["tasks"]["piqa"]["limit"] == 8
    run_json = json.loads((out / "run.json").read_text())
    assert "eval" in run_json["steps"]
    assert prov["num_layers"] == 4 and prov["skip_ratio_of"] == "all layers"
    assert run_json["parameters"]["eval"]["skip_ratio_of"] == "all layers"
    # a saved run serves as the dense reference of a later run: same paired numbers
    back = EvalResults.load(out)
    assert back.doc_scores("dense", "piqa", "acc") == res.doc_scores("dense", "piqa", "acc")
    pd.testing.assert_series_equal(back.table.skip_ratio.astype(float), res.table.skip_ratio.astype(float))


def test_saved_dense_reference_pairs_like_a_fresh_one(tok, quick_run):
    res, out, ms = quick_run
    again = evaluate(ms, tok, task_set="quick", tasks=["rte"], limit=8, batch_size=2, dense_reference=out)
    assert "dense" not in set(again.table.variant)
    a = again.paired[again.paired.metric == "acc"].iloc[0]
    b = res.paired[(res.paired.task == "rte") & (res.paired.metric == "acc")].iloc[0]
    assert (a["diff"], a.ci_low, a.ci_high) == pytest.approx((b["diff"], b.ci_low, b.ci_high))
    with pytest.raises(ValueError, match="lacks tasks"):
        evaluate(ms, tok, task_set="quick", tasks=["boolq"], limit=2, dense_reference=out)
    with pytest.raises(ValueError, match="same limit"):
        evaluate(ms, tok, task_set="quick", tasks=["rte"], limit=4, dense_reference=out)


def test_reused_dense_scores_combine_with_a_new_variant(tok, quick_run):
    res, out, ms = quick_run
    dense = EvalResults.load(out).only(["dense"], tasks=["rte"])
    assert set(dense.table.variant) == {"dense"} and set(dense.table.task) == {"rte"}
    assert list(dense.per_doc) == ["dense"] and list(dense.tasks) == ["rte"] and len(dense.paired) == 0
    again = evaluate(ms, tok, task_set="quick", tasks=["rte"], limit=8, batch_size=2, variant="again",
                     dense_reference=dense)
    both = EvalResults.combine([dense, again])
    assert set(both.table.variant) == {"dense", "again"}
    assert both.doc_scores("dense", "rte", "acc") == res.doc_scores("dense", "rte", "acc")
    with pytest.raises(ValueError, match="no variant"):
        res.only(["static_drop_k1"])
    with pytest.raises(ValueError, match="no task"):
        res.only(["dense"], tasks=["boolq"])


def test_dense_reference_of_another_model_is_refused(tok, quick_run):
    _, out, ms = quick_run
    ref = EvalResults.load(out)
    ref.provenance["model"] = "some-other-model"
    with pytest.raises(ValueError, match="same base model"):
        evaluate(ms, tok, task_set="quick", tasks=["rte"], limit=8, batch_size=2, dense_reference=ref)


# ------------------------------------------------------------------ bad input, before any work
@pytest.fixture
def no_harness(monkeypatch):
    """Fail if the harness is started (task index or evaluation)."""
    import rt_lib.evaluation.driver as ev

    def boom(*a, **k):
        raise AssertionError("the harness was started")

    monkeypatch.setattr(lm_eval, "simple_evaluate", boom)
    monkeypatch.setattr(ev, "task_manager", boom)
    monkeypatch.setattr(ev, "MindSkipLM", boom)


@pytest.mark.parametrize("kwargs, match", [
    ({"tasks": ["arc_chalenge"]}, "unknown task"),
    ({"tasks": ["piqa", "hellaswag_v2"]}, "unknown task"),
    ({"limit": 0}, "no documents"),
    ({"limit": -3}, "no documents"),
    ({"batch_size": 0}, "batch_size"),
    ({"task_set": "fast"}, "unknown task set 'fast'; task sets: paper, offline, quick, evidence, evidence-whole"),
    ({"task_set": "paper"}, "HF_HUB_OFFLINE"),
    ({"confidence": 95}, "confidence"),
])
def test_bad_input_raises_before_running(tok, no_harness, kwargs, match):
    model = tiny_llama(tok)
    with pytest.raises(ValueError, match=match):
        evaluate(model, tok, **kwargs)


def test_router_checkpoint_for_another_model_is_refused(tok, tmp_path):
    routed(tiny_llama(tok, hidden=32)).save_pretrained(tmp_path / "routers")
    other = tiny_llama(tok, hidden=48)
    with pytest.raises(ValueError, match="does not fit this model.*tuned on"):
        MindSkipLM(pretrained=other, tokenizer=tok, routers=tmp_path / "routers")
    with pytest.raises(ValueError, match="router checkpoint folder"):
        MindSkipLM(pretrained=other, tokenizer=tok, routers=tmp_path / "nothing")
    with pytest.raises(ValueError, match="needs routers"):
        MindSkipLM(pretrained=other, tokenizer=tok, threshold=0.5)


def test_cli_rejects_bad_input_before_loading_a_model(monkeypatch):
    monkeypatch.setattr(assets, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(ValueError, match="unknown task"):
        main(["run", "--tasks", "piqa,nope"])
    with pytest.raises(ValueError, match="no documents"):
        main(["run", "--limit", "0"])
    with pytest.raises(ValueError, match="no documents"):  # the harness CLI path
        main(["--model", "mindskip", "--model_args", "pretrained=tiny-random-llama", "--tasks", "rte_offline", "--limit", "0"])


def test_cli_task_set_flag_and_its_deprecated_spellings(monkeypatch, capsys):
    """``evaluate run --task-set``; the old ``evaluate preset`` and ``--preset`` still work, each
    with a one-line note, and an unknown task set names the choices."""
    monkeypatch.setattr(assets, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(ValueError, match="unknown task"):
        main(["run", "--task-set", "offline", "--tasks", "nope"])
    assert capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="for task set 'evidence'"):
        main(["preset", "--preset", "evidence", "--tasks", "nope"])
    assert capsys.readouterr().err.splitlines() == ["note: evaluate preset is deprecated, use evaluate run",
                                                     "note: --preset is deprecated, use --task-set"]
    with pytest.raises(SystemExit):
        main(["run", "--task-set", "fast"])
    assert "invalid choice: 'fast'" in capsys.readouterr().err


def test_evaluate_takes_the_old_preset_keyword_with_a_warning(tok, no_harness):
    with pytest.warns(DeprecationWarning, match="task_set"), pytest.raises(ValueError, match="unknown task set 'fast'"):
        evaluate(tiny_llama(tok), tok, preset="fast")


@pytest.mark.slow
def test_module_cli_runs_the_harness_with_the_kit_model(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "rt_lib", "evaluate", "--model", "mindskip",
           "--model_args", "pretrained=tiny-random-llama", "--tasks", "rte_offline", "--limit", "2",
           "--batch_size", "2", "--output_path", str(tmp_path / "out"), "--log_samples"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = list((tmp_path / "out").rglob("results_*.json"))
    assert files and json.loads(files[0].read_text())["results"]["rte_offline"]["alias"] == "rte_offline"


@pytest.mark.slow
def test_data_parallel_processes_score_like_one(tmp_path):
    """torchrun with 2 CPU processes (gloo) = 1 process: same prompts, scores, skip counts."""
    model, _ = assets.load_model("tiny-random-llama")
    routed(model, layers=(1, 2)).save_pretrained(tmp_path / "routers")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "1"}
    args = ["-m", "rt_lib", "evaluate", "--model", "mindskip",
            "--model_args", f"pretrained=tiny-random-llama,routers={tmp_path / 'routers'}",
            "--tasks", "arc_challenge_offline", "--num_fewshot", "3", "--limit", "8",
            "--batch_size", "2", "--log_samples"]
    out = {}
    for n in (1, 2):
        launcher = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    "--nproc_per_node", "2", "--master_port", "29517"]
        proc = subprocess.run([*launcher, *args, "--output_path", str(tmp_path / f"p{n}")], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        if n == 2:
            assert "on rank 1" in proc.stderr  # really two processes
        samples = [json.loads(line) for line in next((tmp_path / f"p{n}").rglob("samples_*.jsonl")).open()]
        results = json.loads(next((tmp_path / f"p{n}").rglob("results_*.json")).read_text())
        out[n] = ({s["doc_id"]: (s["prompt_hash"], s["acc"], s["acc_norm"], [float(r[0][0]) for r in s["resps"]])
                   for s in samples}, results)
    (one, r1), (two, r2) = out[1], out[2]
    assert one.keys() == two.keys() == set(range(8))
    for k in one:
        assert one[k][:3] == two[k][:3]
        assert one[k][3] == pytest.approx(two[k][3], abs=1e-4)
    assert r1["config"]["mindskip"]["executed_fraction"] == r2["config"]["mindskip"]["executed_fraction"]


def test_group_stderr_from_documents_when_the_harness_gives_none():
    """Quick MMLU scores one document per subject: the harness's group stderr is N/A."""
    from rt_lib.evaluation.tables import collect_scores

    samples = {f"mmlu_offline_{s}": [{"doc_id": 0, "acc": a, "prompt_hash": "h"}]
               for s, a in zip("abcd", [1.0, 0.0, 0.0, 1.0])}
    res = {"results": {"mmlu_offline": {"acc,none": 0.5, "acc_stderr,none": "N/A"}}, "samples": samples}
    values, docs, n = collect_scores(res, "mmlu_offline", ["acc"])
    assert n == 4 and docs["keys"][0] == ["mmlu_offline_a", 0]
    assert values["acc"] == (0.5, pytest.approx((1 / 3) ** 0.5 / 2))  # sd (ddof 1) / sqrt(n)


@pytest.mark.slow
def test_eval_cost_counts_the_requests_hflm_would_run(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_cost", Path(__file__).parents[1] / "benchmarks" / "eval_cost.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "cost.json"
    assert mod.main(["--task-set", "quick", "--pretrained", "tiny-random-llama", "--tasks", "piqa,mmlu",
                     "--limit", "3", "--out", str(out)]) == 0
    rows = {r["task"]: r for r in json.loads(out.read_text())["tasks"]}
    assert rows["piqa"]["docs"] == 3 and rows["piqa"]["requests"] == 6  # two solutions per question
    # MMLU: 4 one-letter answers share one forward pass per question (57 subjects x 3)
    assert rows["mmlu"]["docs"] == 171 and rows["mmlu"]["requests"] == 4 * 171
    assert rows["mmlu"]["forward_passes"] == 171
    for r in rows.values():
        assert 0 < r["input_tokens"] <= r["padded_tokens"]
    assert mod.padded_batches([5, 9, 2], 2) == [(2, 9), (1, 2)]


def test_harness_environment_record_is_collected_once_per_process(monkeypatch):
    """Every harness call stores the same environment record; it is collected once (torch's
    collect_env runs a dozen subprocesses) and the harness's own function is back afterwards."""
    import lm_eval.evaluator as harness_evaluator

    from rt_lib.evaluation import harness

    calls = []

    def collect(storage):
        calls.append(1)
        storage.update(pretty_env_info=f"env {len(calls)}", lm_eval_version="x")

    monkeypatch.setattr(harness_evaluator, "add_env_info", collect)
    monkeypatch.setattr(harness, "_ENV_INFO", {})
    first, second = {}, {}
    with harness.env_info_once():
        harness_evaluator.add_env_info(first)
        harness_evaluator.add_env_info(second)
    assert calls == [1] and first == second == {"pretty_env_info": "env 1", "lm_eval_version": "x"}
    assert first is not second
    assert harness_evaluator.add_env_info is collect


def test_offline_tasks_load_without_download_counts_and_leave_the_setting_as_it_was(monkeypatch):
    import datasets.config

    from rt_lib.evaluation.harness import load_task, task_manager
    from rt_lib.evaluation.tasks import TASK_SETS

    seen = []
    tm = task_manager(offline=True)
    real_load = tm.load
    monkeypatch.setattr(tm, "load", lambda names: seen.append(datasets.config.HF_UPDATE_DOWNLOAD_COUNTS)
                        or real_load(names))
    monkeypatch.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", True)
    name, task = load_task(tm, TASK_SETS["quick"], "rte")
    assert name == "rte_offline" and len(task.eval_docs) > 0
    assert seen == [False] and datasets.config.HF_UPDATE_DOWNLOAD_COUNTS is True


def test_results_written_before_the_rename_load_with_their_task_set():
    """Committed eval/results.json files call the task set ``preset``; loading them (as a dense
    reference, or to combine the evidence run's parts) reads it as the task set."""
    old = ROOT / "results" / "runs" / "cpu-main" / "eval" / "results.json"
    assert json.loads(old.read_text())["preset"] == "quick"
    res = EvalResults.load(old)
    assert res.task_set == "quick" and res.options()["task_set"] == "quick"
