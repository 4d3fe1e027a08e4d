"""The evidence run: seeded document samples, per-document choice records, float32 logits of a
bfloat16 model, results combined from per-task parts, the paired measures, the claim rules,
and (slow) a resumable run of ``rt_lib.evidence.run`` on the embedded model."""

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from rt_lib.paper import claims
from rt_lib.evaluation import measures
from rt_lib.assets import loading as assets
from rt_lib.evaluation.results import MACRO, EvalResults
from rt_lib.evaluation.driver import evaluate
from rt_lib.evaluation.harness import float32_logits
from rt_lib.evaluation.tasks import TASK_SETS, sample_documents

from test_evaluation import routed, tiny_llama

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return assets.load_model("tiny-random-llama")[1]


# ------------------------------------------------------------------------- samples
def test_sample_documents_is_a_fixed_draw_of_n_pooled_documents():
    sizes = {"a": 30, "b": 5, "c": 70}
    s = sample_documents(sizes, 40, seed=3)
    assert sum(len(v) for v in s.values()) == 40
    assert all(v == sorted(set(v)) and all(0 <= i < sizes[k] for i in v) for k, v in s.items())
    assert s == sample_documents(dict(reversed(sizes.items())), 40, seed=3)  # order of the leaves is irrelevant
    assert s != sample_documents(sizes, 40, seed=4)
    assert sample_documents(sizes, 105, seed=3) is None  # all documents: no sample
    with pytest.raises(ValueError, match="positive"):
        sample_documents(sizes, 0, seed=3)


def test_a_sampled_task_set_scores_exactly_the_drawn_documents(tok, monkeypatch):
    monkeypatch.setitem(TASK_SETS, "evidence", replace(TASK_SETS["evidence"], sample=6))
    res = evaluate(tiny_llama(tok), tok, task_set="evidence", tasks=["rte"], batch_size=4)
    keys = [tuple(k) for k in res.per_doc["dense"]["rte"]["keys"]]
    drawn = sample_documents({"rte_offline": 277}, 6, TASK_SETS["evidence"].sample_seed)
    assert keys == [("rte_offline", i) for i in drawn["rte_offline"]]
    assert res.tasks["rte"]["sample"] == {"n": 6, "seed": TASK_SETS["evidence"].sample_seed, "of": 277}


# ------------------------------------------------------------------------- choice records
def test_choice_records_reproduce_the_harness_scores(tok):
    """gold/pred/pred_norm per document give back the harness's acc and acc_norm, for a plain
    task, a length-normalised one and WinoGrande's partial scoring (gold from doc_to_text)."""
    res = evaluate(tiny_llama(tok), tok, task_set="quick", tasks=["arc_challenge", "boolq", "winogrande"], limit=6,
                   batch_size=4)
    for task, d in res.per_doc["dense"].items():
        assert len(d["gold"]) == len(d["keys"]) == 6
        assert [float(p == g) for p, g in zip(d["pred"], d["gold"])] == d["acc"], task
        if "acc_norm" in d:
            assert [float(p == g) for p, g in zip(d["pred_norm"], d["gold"])] == d["acc_norm"], task
        assert all(math.isfinite(x) and x <= 0 for x in d["ll_gold"])
        # every choice's log-likelihood and the length acc_norm divides it by are kept
        assert [c[g] for c, g in zip(d["ll_choices"], d["gold"])] == d["ll_gold"]
        assert [c[g] / n[g] for c, n, g in zip(d["ll_choices"], d["choice_chars"], d["gold"])] == d["ll_gold_norm"]
        assert [max(range(len(c)), key=c.__getitem__) for c in d["ll_choices"]] == d["pred"]


def test_float32_logits_projects_a_bfloat16_model_in_float32(tok):
    model = tiny_llama(tok).to(torch.bfloat16)
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with float32_logits(model):
            out = model(input_ids=ids, output_hidden_states=True)
        head = model.get_output_embeddings().weight
        want = torch.nn.functional.linear(out.hidden_states[-1].float(), head.float())
        again = model(input_ids=ids).logits
    assert plain.dtype == torch.bfloat16 and again.dtype == torch.bfloat16  # the hook is gone afterwards
    assert out.logits.dtype == torch.float32
    torch.testing.assert_close(out.logits, want)
    assert (out.logits - plain.float()).abs().max() > 0  # bfloat16 rounding is what it removes


def test_float32_logits_skips_the_half_precision_product_and_respects_a_hooked_head(tok, monkeypatch):
    """The fast path never runs the head's own bfloat16 product; a head whose forward was
    replaced (as accelerate's device hooks do) keeps it, and its output is still float32."""
    model = tiny_llama(tok).to(torch.bfloat16)
    head = model.get_output_embeddings()
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    calls = []
    original = type(head).forward
    monkeypatch.setattr(type(head), "forward", lambda self, x: (self is head and calls.append(1)) or original(self, x))
    with torch.no_grad():
        with float32_logits(model):
            fast = model(input_ids=ids).logits
        assert calls == [] and "forward" not in head.__dict__
        own = []
        head.forward = lambda x: own.append(1) or original(head, x)  # an instance forward, e.g. a device hook
        wrapped = head.forward
        with float32_logits(model):
            hooked = model(input_ids=ids).logits
        assert own == [1] and head.forward is wrapped
    assert fast.dtype == hooked.dtype == torch.float32
    torch.testing.assert_close(fast, hooked)


# ------------------------------------------------------------------------- combined parts
@pytest.fixture(scope="module")
def parts_and_whole(tok, tmp_path_factory):
    model = tiny_llama(tok, seed=1)
    ms = routed(model, layers=(1, 2), seed=2)
    ms.eval()
    tasks, common = ["boolq", "rte"], dict(task_set="quick", limit=5, batch_size=4)
    whole = evaluate(ms, tok, tasks=tasks, **common)
    dense = {t: evaluate(ms, tok, tasks=[t], variant="dense", **common) for t in tasks}
    parts = list(dense.values()) + [evaluate(ms, tok, tasks=[t], variant="mindskip", dense_reference=dense[t],
                                             **common) for t in tasks]
    combined = EvalResults.combine(parts)
    run = tmp_path_factory.mktemp("combined") / "run"
    combined.save(run)
    return whole, combined, run


@pytest.mark.slow
def test_parts_per_task_combine_to_the_same_tables_as_one_evaluation(parts_and_whole):
    whole, combined, _ = parts_and_whole
    cols = ["variant", "task", "metric", "value", "n"]
    a = whole.table[cols].sort_values(cols[:3]).reset_index(drop=True)
    b = combined.table[cols].sort_values(cols[:3]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b, check_dtype=False)
    pa = whole.paired.sort_values(["variant", "task", "metric"]).reset_index(drop=True)
    pb = combined.paired.sort_values(["variant", "task", "metric"]).reset_index(drop=True)
    for c in ("diff", "ci_low", "ci_high"):
        np.testing.assert_allclose(pa[c].astype(float), pb[c].astype(float), rtol=1e-9, atol=1e-12)
    assert set(combined.per_doc["mindskip"]) == {"boolq", "rte"}


def test_combine_refuses_a_task_scored_on_other_documents(tok):
    model = tiny_llama(tok)
    a = evaluate(model, tok, task_set="quick", tasks=["rte"], limit=3, batch_size=4)
    b = evaluate(model, tok, task_set="quick", tasks=["rte"], limit=4, batch_size=4, variant="other",
                 dense_reference=False)
    with pytest.raises(ValueError, match="same documents"):
        EvalResults.combine([a, b])


# ------------------------------------------------------------------------- measures
def _docs(keys, gold, pred, ll, acc=None, choices=None):
    acc = acc if acc is not None else [float(p == g) for p, g in zip(pred, gold)]
    d = {"keys": keys, "acc": acc, "gold": gold, "pred": pred, "pred_norm": pred, "ll_gold": ll, "ll_gold_norm": ll}
    if choices is not None:
        d["ll_choices"] = choices
    return d


def test_task_measures_pair_documents_and_count_flips():
    keys = [["t", i] for i in range(6)]
    dense = _docs(keys, [0, 0, 0, 1, 0, 1], [0, 0, 1, 1, 0, 1], [-1.0, -2.0, -3.0, -1.0, -2.0, -1.0])
    var = _docs(keys, [0, 0, 0, 1, 0, 1], [0, 1, 1, 0, 0, 1], [-1.5, -2.5, -3.0, -2.0, -2.0, -1.0])
    m = measures.task_measures(var, dense, "acc")
    assert m["n"] == 6 and m["acc_diff"] == pytest.approx(-2 / 6)
    assert m["flip_rate"] == pytest.approx(2 / 6)
    assert m["flip_ci_low"] < 2 / 6 < m["flip_ci_high"]
    assert m["majority_rate"] == pytest.approx(4 / 6)


def test_gold_logprob_is_the_log_softmax_of_the_choices_at_the_gold_index():
    # choices of likelihood 0.1 and 0.3 normalise to 1/4 and 3/4; four equal ones to 1/4 each
    assert measures.gold_logprob([math.log(0.1), math.log(0.3)], 0) == pytest.approx(math.log(0.25))
    assert measures.gold_logprob([math.log(0.1), math.log(0.3)], 1) == pytest.approx(math.log(0.75))
    assert measures.gold_logprob([-7.0, -7.0, -7.0, -7.0], 2) == pytest.approx(math.log(0.25))


def test_gold_logp_diff_by_hand_on_a_tiny_record_set():
    """Two documents with hand-computed normalised gold log-probabilities, paired per document."""
    keys = [["t", 0], ["t", 1]]
    # dense: doc 0 choices [-1, -1] (gold 0: log 1/2); doc 1 choices [-2, -1, -1-ln 2] (gold 1: 1/(e^-1+1+1/2))
    dense = _docs(keys, [0, 1], [0, 1], [-1.0, -1.0],
                  choices=[[-1.0, -1.0], [-2.0, -1.0, -1.0 - math.log(2)]])
    # variant: doc 0 choices [-1, -1 + ln 3] (gold 0: 1/4); doc 1 unchanged
    var = _docs(keys, [0, 1], [1, 1], [-1.0, -1.0],
                choices=[[-1.0, -1.0 + math.log(3)], [-2.0, -1.0, -1.0 - math.log(2)]])
    d0 = math.log(1 / 4) - math.log(1 / 2)
    m = measures.task_measures(var, dense, "acc")
    assert m["gold_logp_diff"] == pytest.approx(d0 / 2)
    assert m["gold_logp_note"] == ""
    # the same records under acc_norm: the measure is the same number (one unit for every task)
    m_norm = measures.task_measures({**var, "acc_norm": var["acc"]}, {**dense, "acc_norm": dense["acc"]}, "acc_norm")
    assert m_norm["gold_logp_diff"] == pytest.approx(m["gold_logp_diff"])


def test_gold_logp_unit_is_the_same_for_acc_and_acc_norm_tasks():
    """A per-character log-likelihood would differ between an acc task and an acc_norm task with
    the same choices; the normalised gold log-probability does not depend on the metric."""
    keys = [["t", 0]]
    dense = _docs(keys, [0], [0], [-3.0], choices=[[-3.0, -4.0]])
    var = _docs(keys, [0], [0], [-3.5], choices=[[-3.5, -3.6]])
    want = measures.gold_logprob([-3.5, -3.6], 0) - measures.gold_logprob([-3.0, -4.0], 0)
    for metric in ("acc", "acc_norm"):
        v, d = ({**x, "acc_norm": x["acc"]} for x in (var, dense))
        assert measures.task_measures(v, d, metric)["gold_logp_diff"] == pytest.approx(want)


def test_records_without_per_choice_log_likelihoods_give_no_gold_logp():
    """Records written before the choices' log-likelihoods were stored: the measure is missing,
    with the reason, never computed from the gold log-likelihood alone; the macro follows."""
    keys = [["t", i] for i in range(3)]
    dense = _docs(keys, [0, 1, 0], [0, 1, 1], [-1.0, -2.0, -3.0])
    var = _docs(keys, [0, 1, 0], [0, 0, 1], [-1.5, -2.5, -3.0])
    m = measures.task_measures(var, dense, "acc")
    assert math.isnan(m["gold_logp_diff"]) and math.isnan(m["gold_logp_ci_low"])
    assert "no per-choice log-likelihoods" in m["gold_logp_note"]
    ok = _docs(keys, [0, 1, 0], [0, 1, 1], [-1.0, -2.0, -3.0], choices=[[-1.0, -2.0]] * 3)
    good = {**measures.task_measures(ok, ok, "acc"), "task": "a"}
    macro = measures._macro([good, {**m, "task": "b"}], measures.MACRO, 0.95)
    assert math.isnan(macro["gold_logp_diff"]) and "no per-choice log-likelihoods" in macro["gold_logp_note"]
    assert macro["acc_diff"] == pytest.approx((0.0 + m["acc_diff"]) / 2)


def test_evidence_measures_agree_with_paired_csv(parts_and_whole):
    _, combined, run = parts_and_whole
    table = measures.evidence_measures(run, num_layers=4)
    paired = combined.paired.set_index(["variant", "task"])
    for _, r in table[~table.task.str.startswith("macro")].iterrows():
        assert r.acc_diff == pytest.approx(paired.loc[(r.variant, r.task), "diff"])
    macro = table[(table.task == MACRO)].iloc[0]
    assert macro.acc_diff == pytest.approx(paired.loc[("mindskip", MACRO), "diff"])
    assert macro.skip_ratio == pytest.approx(macro.skipped_layers / 4)
    # records written with every choice's log-likelihood give the normalised gold log-probability
    assert table.gold_logp_diff.notna().all() and (table.gold_logp_note.fillna("") == "").all()


# ------------------------------------------------------------------------- claims
@pytest.mark.parametrize("lo,hi,want", [(0.1, 0.5, claims.HOLDS), (-0.5, -0.1, claims.FAILS),
                                        (-0.1, 0.1, claims.OPEN), (math.nan, 1.0, claims.OPEN)])
def test_above_decides_from_where_the_interval_lies(lo, hi, want):
    assert claims.above(lo, hi) == want


def test_at_least_is_non_inferiority_with_a_margin():
    assert claims.at_least(-0.9, 0.5, -1.0) == claims.HOLDS
    assert claims.at_least(-1.5, 0.5, -1.0) == claims.OPEN
    assert claims.at_least(-3.0, -1.2, -1.0) == claims.FAILS


def test_the_papers_numbers_in_the_claims_come_from_the_reference_data(tmp_path):
    """The main table's speedup (and the Figure 2 differences) the claims quote are read from
    results/reference, not written into the code: a changed reference changes them."""
    import shutil

    ref = ROOT / "results" / "reference"
    paper = claims._paper_values(ref)
    assert paper["speedup"] == 1.21 and paper["c1"][8] == pytest.approx(44.6 - 50.3)
    copy = tmp_path / "reference"
    shutil.copytree(ref, copy)
    table = copy / "main_table.csv"
    table.write_text(table.read_text().replace("Llama-3-8B,router-tuning,attn,seq,1.21,",
                                               "Llama-3-8B,router-tuning,attn,seq,1.5,"))
    assert claims._paper_values(copy)["speedup"] == 1.5


def test_speedup_interval_from_paired_rounds():
    sp, lo, hi, n = claims.speedup_interval([120, 120, 120], [100, 100, 100])
    assert (sp, lo, hi, n) == pytest.approx((1.2, 1.2, 1.2, 3))
    sp, lo, hi, _ = claims.speedup_interval([120, 110, 130, 125], [100, 100, 100, 100])
    assert lo < sp < hi and lo > 1.0


# ------------------------------------------------------------------------- the run
def test_evidence_names_the_task_sets_and_grids_and_reads_an_older_plan(tmp_path):
    """A wrong task set or grid is refused with the choices before anything runs; a plan.json
    written when the task set was recorded as ``task_preset`` is continued, not refused."""
    from rt_lib.evidence.run import Evidence

    routers = ROOT / "results" / "runs" / "cpu-main" / "train" / "routers"
    with pytest.raises(ValueError, match="unknown task set 'quik'; task sets: paper, offline, quick"):
        Evidence(tmp_path / "ev", routers, task_set="quik")
    with pytest.raises(ValueError, match="unknown profile grid 'fast'; grids: smoke, quick, full"):
        Evidence(tmp_path / "ev", routers, profile_grid="fast")
    ev = Evidence(tmp_path / "ev", routers, tasks=["rte"], limit=3)
    plan = ev.plan()
    assert plan["task_set"] == "evidence"
    older = {("task_preset" if k == "task_set" else k): v for k, v in plan.items()}
    (ev.dir / "plan.json").write_text(json.dumps(older))
    assert Evidence(tmp_path / "ev", routers, tasks=["rte"], limit=3).plan() == plan
    with pytest.raises(ValueError, match=r"other settings \(\['task_set'\]\)"):
        Evidence(tmp_path / "ev", routers, tasks=["rte"], limit=3, task_set="evidence-whole").plan()


@pytest.mark.slow
def test_evidence_run_resumes_and_decides_claims(tmp_path):
    from rt_lib.evidence.run import Evidence

    out = tmp_path / "ev"
    # a smoke run: few documents and blocks, calibration stopped within half a layer, importance
    # of the static drop from 4 blocks
    kw = dict(tasks=["rte"], limit=3, targets=(4,), calibration_blocks=2, heldout_blocks=3, profile_grid="smoke",
              calibration_tolerance=0.5, static_drop_samples=4)
    routers = ROOT / "results" / "runs" / "cpu-main" / "train" / "routers"
    Evidence(out, routers, **kw).run()
    parts = sorted((out / "evidence" / "parts").iterdir())
    assert [p.name for p in parts] == ["dense__rte", "mindskip_k4__rte", "mindskip_t0.5__rte",
                                       f"static_drop_k{parts[-1].name.split('_k')[1].split('__')[0]}__rte"]
    cal = json.loads((out / "evidence" / "calibration.json").read_text())["main"]["4"]
    assert abs(cal["skipped"] - 4) <= 0.5 and len(cal["trace"]) < 14
    assert json.loads((out / "evidence" / "static_drop_scores.json").read_text())["calibration"]["sequences"] == 4
    stamp = {p.name: (p / "eval" / "results.json").stat().st_mtime_ns for p in parts}
    import shutil

    shutil.rmtree(parts[1])
    Evidence(out, routers, **kw).run()  # continues: only the removed part is scored again
    again = {p.name: (p / "eval" / "results.json").stat().st_mtime_ns for p in parts}
    assert {k for k in stamp if stamp[k] != again[k]} == {parts[1].name}
    for changed in ({"limit": 4}, {"calibration_tolerance": 0.0}, {"static_drop_samples": 64}):
        with pytest.raises(ValueError, match="other settings"):
            Evidence(out, routers, **{**kw, **changed}).plan()
    table = claims.build_claims(out)
    assert set(table.verdict) <= {claims.HOLDS, claims.FAILS, claims.OPEN}
    assert table.claim.str.startswith("C1").any() and table.claim.str.startswith("C5").any()
    assert list(table.columns) == claims.CLAIM_COLUMNS
