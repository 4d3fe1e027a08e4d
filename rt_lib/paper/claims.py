"""The paper's claims, decided from an evidence run by written rules (``claims.csv`` / ``.md``).

    python -m rt_lib paper            # also writes results/tables/claims.{csv,md}
    from rt_lib.paper.claims import build_claims
    table = build_claims("results/runs/evidence-cpu")

Inputs are files only: the evidence run (``rt_lib.evidence.run``: ``eval/results.json`` with
per-document records, ``evidence/heldout/*.json``, ``evidence/plan.json``), the run that tuned
its routers (``train/summary.json``, ``profile/profile.json``) and the paper's published
numbers (``results/reference/``). Every verdict comes from the rule in its row, applied to
the interval in its row; nothing is decided by hand.

Claims (one row each; ``k``: skipped attention sublayers per sequence, of the model's layers):

* C1: MindSkip (attn, seq) stays within 1 point of dense at about 12.5% and 25% skip;
* C2: MindSkip beats static attention drop at the same number of skipped layers, in
  accuracy and in held-out loss;
* C3: attention routing beats MLP and block routing at the same number of skipped sublayers
  (held-out loss: the evidence run scores accuracy only for attention routers);
* C4: sequence routing is at least as good as token routing (held-out loss, each granularity);
* C5: router-only tuning takes minutes and trains only router weights;
* C6: the speedup at the operating point of the tuned routers, with C1's accuracy rule there.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from rt_lib.evaluation import stats
from rt_lib.evaluation.measures import MACRO, MACRO_ABOVE_CHANCE, evidence_measures, heldout_table, paired_loss_difference

CLAIM_COLUMNS = ["claim", "role", "paper_value", "measure", "kit_value", "ci_low", "ci_high", "n", "verdict", "rule",
                 "run"]
PRIMARY, SECONDARY = "primary", "secondary"  # role: the row that decides a claim / a row shown beside it
SKIP_TOLERANCE = 0.1  # layers: realised skips closer than this count as equal
HOLDS, FAILS, OPEN = "holds", "does not hold", "inconclusive"
ACC_MARGIN = 1.0  # points: C1's "within 1 point"
LOSS_MARGIN = 0.01  # nats: C4's non-inferiority margin on held-out loss
TUNING_MINUTES = 60.0  # C5's "minutes": under an hour


# ------------------------------------------------------------------------- rules
def above(ci_low: float, ci_high: float, margin: float = 0.0) -> str:
    """``holds`` when the whole interval lies above ``margin``, ``does not hold`` when it lies
    below, else ``inconclusive`` (also for a missing interval)."""
    if any(v is None or v != v for v in (ci_low, ci_high)):
        return OPEN
    return HOLDS if ci_low > margin else FAILS if ci_high < margin else OPEN


def at_least(ci_low: float, ci_high: float, margin: float) -> str:
    """Non-inferiority: ``holds`` when the interval lies at or above ``margin``, ``does not
    hold`` when it lies below, else ``inconclusive``."""
    if any(v is None or v != v for v in (ci_low, ci_high)):
        return OPEN
    return HOLDS if ci_low >= margin else FAILS if ci_high < margin else OPEN


# ------------------------------------------------------------------------- helpers
def _reference(ref_dir: Path, name: str) -> pd.DataFrame:
    from rt_lib.paper.tables import load_reference

    return load_reference(name, ref_dir)


def _paper_values(ref_dir: Path) -> dict:
    """The published numbers the claims are compared with."""
    main = _reference(ref_dir, "main_table")
    fig2 = _reference(ref_dir, "drop_vs_mindskip")
    llama = main[main.model == "Llama-3-8B"]

    def avg(method, gran=None, level=None):
        s = llama[llama.method == method]
        if gran:
            s = s[(s.granularity == gran) & (s.route_level == level)]
        return float(s.avg.iloc[0])

    def fig(method, skip):
        return float(fig2[(fig2.method == method) & np.isclose(fig2.skip_ratio, skip)].performance.iloc[0])

    base = fig("dense", 0.0)
    return {
        "c1": {k: fig("mindskip", s) - base for k, s in ((4, 0.125), (8, 0.25))},
        "c2": {k: fig("mindskip", s) - fig("static_drop", s) for k, s in ((4, 0.125), (8, 0.25))},
        "attn_seq": avg("mindskip", "attn", "seq"), "dense": avg("dense"),
        "avg": {(g, lv): avg("mindskip", g, lv) for g in ("attn", "mlp", "block") for lv in ("seq", "token")},
        "speedup": float(llama[(llama.granularity == "attn") & (llama.route_level == "seq")].speedup.iloc[0]),
    }


def _per_doc(run_dir: Path) -> dict:
    return json.loads((run_dir / "eval" / "results.json").read_text())


def _paired_variants(res: dict, a: str, b: str, tasks: list[str] | None = None) -> stats.PairedDifference:
    """Macro-averaged paired accuracy difference a - b over the tasks both scored (paper metric),
    or over ``tasks`` only."""
    parts = []
    for task, info in res["tasks"].items():
        if tasks is not None and task not in tasks:
            continue
        da, db = res["per_doc"][a].get(task), res["per_doc"][b].get(task)
        if da is None or db is None:
            continue
        m = info["metric"]
        _, x, y = stats.pair_scores({tuple(k): v for k, v in zip(da["keys"], da[m])},
                                    {tuple(k): v for k, v in zip(db["keys"], db[m])})
        parts.append(stats.paired_difference(x, y))
    return stats.macro_difference(parts)


def speedup_interval(dense_ms: list[float], variant_ms: list[float], confidence: float = 0.95) -> tuple:
    """Speedup dense/variant from interleaved rounds: the geometric mean of the per-round
    ratios with a t interval on their logs (rounds are paired: they ran back to back)."""
    logs = np.log(np.asarray(dense_ms, dtype=float)) - np.log(np.asarray(variant_ms, dtype=float))
    n = len(logs)
    mean = float(logs.mean())
    if n < 2:
        return math.exp(mean), math.nan, math.nan, n
    half = float(scipy_stats.t.ppf(0.5 + confidence / 2, n - 1)) * float(scipy_stats.sem(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half), n


def _row(claim, paper_value, measure, value, lo, hi, n, verdict, rule, run, role=PRIMARY) -> dict:
    return dict(zip(CLAIM_COLUMNS, (claim, role, paper_value, measure, value, lo, hi, n, verdict, rule, run)))


EQUAL_SKIP_RULE = (f"; at unequal realised skip (more than {SKIP_TOLERANCE:g} layers apart) a verdict stands only "
                   "where the skip difference works against it (the favoured variant skips more and still wins, or "
                   "skips less and still loses), else inconclusive")


def equal_skip(verdict: str, favoured_skip: float, other_skip: float, tol: float = SKIP_TOLERANCE) -> str:
    """A comparison's verdict when the two variants' realised skips may differ: unchanged at equal
    skip (within ``tol`` layers); else ``holds`` stands only if the favoured variant skips more,
    ``does not hold`` only if it skips less, and anything else is ``inconclusive``."""
    if verdict == OPEN or any(v is None or v != v for v in (favoured_skip, other_skip)):
        return OPEN
    if abs(favoured_skip - other_skip) <= tol:
        return verdict
    if verdict == HOLDS:
        return HOLDS if favoured_skip > other_skip else OPEN
    return FAILS if favoured_skip < other_skip else OPEN


def above_chance_tasks(measures: pd.DataFrame) -> list[str]:
    """Tasks whose dense accuracy is above their majority rate (the Wilson 95% interval of dense
    accuracy excludes it): a rule on dense results alone, fixed before any difference is read."""
    rows = measures[~measures.task.isin([MACRO, MACRO_ABOVE_CHANCE])]
    return sorted(rows[rows.above_chance.astype(bool)].task.unique())


# ------------------------------------------------------------------------- the table
def build_claims(evidence_run: str | Path, reference_dir: str | Path | None = None) -> pd.DataFrame:
    """``claims.csv`` rows of one evidence run (see the module docstring)."""
    from rt_lib.paper.tables import DEFAULT_REFERENCE_DIR

    run = Path(evidence_run)
    ev = run / "evidence"
    plan = json.loads((ev / "plan.json").read_text())
    routers = _beside(run, plan["routers"])
    tuned = routers.parent.parent if routers.name == "routers" else routers
    num_layers = int(json.loads((routers / "mindskip_config.json").read_text())["num_layers"])
    paper = _paper_values(Path(reference_dir or DEFAULT_REFERENCE_DIR))
    measures = evidence_measures(run, num_layers=num_layers)
    held = heldout_table(ev, num_layers).set_index("variant")
    res = _per_doc(run)
    rid = run.name
    rows = []
    macro = measures[measures.task == MACRO].set_index("variant")
    above_tasks = above_chance_tasks(measures)
    primary = measures[measures.task == MACRO_ABOVE_CHANCE].set_index("variant")
    if primary.empty:  # every task above chance (or none): the 8-task macro is all there is
        primary = macro
    macros = [(primary, PRIMARY, f"over the {len(above_tasks)} tasks whose dense accuracy is above their majority "
                                 f"rate ({', '.join(above_tasks)})", above_tasks),
              (macro, SECONDARY, f"over all {len(measures[~measures.task.isin([MACRO, MACRO_ABOVE_CHANCE])].task.unique())}"
                                 " tasks", None)]
    if primary is macro:
        macros = macros[1:]
    c1_rule = f"holds if ci_low >= -{ACC_MARGIN:g}; does not hold if ci_high < -{ACC_MARGIN:g}; else inconclusive"
    gt0 = "holds if ci_low > 0; does not hold if ci_high < 0; else inconclusive"
    ms_targets = [v for v in macro.index if macro.loc[v, "method"] == "mindskip" and pd.notna(macro.loc[v, "k"])]
    drops = {int(macro.loc[v, "k"]): v for v in macro.index if macro.loc[v, "method"] == "static_drop"}
    for v in ms_targets:
        k = int(macro.loc[v].k)
        paper_fig = f"{12.5 * k / 4:g}% skip"
        for table, role, over, tasks in macros:
            m = table.loc[v]
            pct = f"{100 * m.skip_ratio:.1f}% skip ({m.skipped_layers:.2f} of {num_layers} layers)"
            rows.append(_row(
                f"C1 MindSkip attn/seq within {ACC_MARGIN:g} point of dense at {pct}",
                f"{paper['c1'].get(k, math.nan):+.1f} (Fig. 2, {paper_fig}); "
                f"{paper['attn_seq'] - paper['dense']:+.1f} (main table, {paper['speedup']:.2f}x)",
                f"macro paired accuracy difference vs dense {over}, points", 100 * m.acc_diff, 100 * m.acc_ci_low,
                100 * m.acc_ci_high, int(m.n), at_least(100 * m.acc_ci_low, 100 * m.acc_ci_high, -ACC_MARGIN),
                c1_rule, rid, role))
            drop = drops.get(int(round(macro.loc[v].skipped_layers)))  # the drop scored for this point
            if drop in res["per_doc"]:
                d = _paired_variants(res, v, drop, tasks)
                ms_skip, drop_skip = float(m.skipped_layers), float(table.loc[drop].skipped_layers)
                rows.append(_row(
                    f"C2 MindSkip beats static attention drop at {ms_skip:.2f} vs {drop_skip:g} skipped layers "
                    "(accuracy)",
                    f"{paper['c2'].get(k, math.nan):+.1f} (Fig. 2, {paper_fig})",
                    f"macro paired accuracy difference {v} - {drop} {over}, points", 100 * d.diff, 100 * d.ci_low,
                    100 * d.ci_high, d.n, equal_skip(above(d.ci_low, d.ci_high), ms_skip, drop_skip),
                    gt0 + EQUAL_SKIP_RULE, rid, role))
    rows += _c2_heldout(run, ev, held, paper, gt0, rid)
    # C3 / C4 on held-out loss, at the largest target
    # the held-out comparisons run at the compare routers' target, whatever the tasks have scored
    ks = [int(r.k) for name, r in held.iterrows() if pd.notna(r.k) and r.method == "mindskip"]
    k = max(ks) if ks else None
    main_v = f"mindskip_k{k}"
    comp = {(r.granularity, r.route_level): name for name, r in held.iterrows()
            if name.endswith(f"_k{k}") and not name.startswith(("mindskip", "static"))}
    comp[("attn", "seq")] = main_v
    for gran in ("mlp", "block"):
        other = comp.get((gran, "seq"))
        if other and main_v in held.index:
            d = paired_loss_difference(ev, other, main_v)
            a, b = _skipped(held, main_v), _skipped(held, other)
            rows.append(_row(
                f"C3 attention routing beats {gran} routing at {k} skipped sublayers (seq)",
                f"{paper['avg'][('attn', 'seq')] - paper['avg'][(gran, 'seq')]:+.1f} (main table avg, attn - {gran})",
                f"held-out loss {other} - {main_v}, nats per token, paired per block; realised skip {a:.2f} vs "
                f"{b:.2f}", d.diff, d.ci_low, d.ci_high, d.n, equal_skip(above(d.ci_low, d.ci_high), a, b),
                gt0 + " (positive: attention routing's loss is lower)" + EQUAL_SKIP_RULE, rid))
    for gran in ("attn", "mlp", "block"):
        seq, tok = comp.get((gran, "seq")), comp.get((gran, "token"))
        if seq and tok:
            d = paired_loss_difference(ev, tok, seq)
            a, b = _skipped(held, seq), _skipped(held, tok)
            rows.append(_row(
                f"C4 sequence routing at least as good as token routing ({gran}, {k} skipped sublayers)",
                f"{paper['avg'][(gran, 'seq')] - paper['avg'][(gran, 'token')]:+.1f} (main table avg, seq - token)",
                f"held-out loss {tok} - {seq}, nats per token, paired per block; realised skip {a:.2f} vs {b:.2f}",
                d.diff, d.ci_low, d.ci_high, d.n, equal_skip(at_least(d.ci_low, d.ci_high, -LOSS_MARGIN), a, b),
                f"holds if ci_low >= -{LOSS_MARGIN:g}; does not hold if ci_high < -{LOSS_MARGIN:g}; else inconclusive"
                + EQUAL_SKIP_RULE, rid))
    rows += _c5(tuned, routers)
    rows += _c6(*_speed_source(run, tuned, primary), paper, rid)
    table = pd.DataFrame(rows, columns=CLAIM_COLUMNS)
    order = table.claim.str.extract(r"^C(\d+)", expand=False).astype(int)
    return table.iloc[order.argsort(kind="stable")].reset_index(drop=True)


def _skipped(held: pd.DataFrame, variant: str) -> float:
    return float(held.loc[variant, "skipped_layers"]) if variant in held.index else math.nan


FRONTIER_RUN = "router-frontier"  # the frontier run folder beside the evidence run (rt_lib.evidence.frontier)


def _c2_heldout(run: Path, ev: Path, held: pd.DataFrame, paper: dict, gt0: str, rid: str) -> list[dict]:
    """C2 on held-out loss: from the frontier run beside the evidence run when it exists (the
    winning routers against each static drop interpolated to the same realised skip), else from
    the evidence run's own held-out scores (equal-skip rule on the realised skips)."""
    from rt_lib.evidence.frontier import FRONTIER_CSV, missing_points, winning_recipe

    path = run.parent / FRONTIER_RUN / "frontier" / FRONTIER_CSV
    rows = []
    if path.exists() and not missing_points(path.parent):  # a frontier still being measured decides nothing
        fr = pd.read_csv(path)
        win = winning_recipe(fr)
        pts = fr[(fr.family == f"mindskip:{win}") & fr.target_skipped.notna()] if win else fr.iloc[:0]
        for _, p in pts.iterrows():
            k = int(p.target_skipped)
            if k not in (4, 8):  # the paper's two operating points (12.5% and 25% of all layers; here ~4 and 8 of 30)
                continue
            for short, role, what in (("importance", PRIMARY, "the paper's static attention drop (lowest 1 - cos)"),
                                      ("greedy", SECONDARY, "the best static drop found (greedy on calibration loss)")):
                v, lo, hi = (-p[f"vs_{short}_equal_skip"], -p[f"vs_{short}_ci_high"], -p[f"vs_{short}_ci_low"])
                rows.append(_row(
                    f"C2 MindSkip beats {what} at equal skip ({p.skipped:.2f} of {p.skipped / p.skipped_share:.0f} "
                    f"layers; held-out loss)", f"{paper['c2'].get(k, math.nan):+.1f} points (Fig. 2, accuracy)",
                    f"held-out loss static ({short}, interpolated to the same realised skip) - MindSkip "
                    f"(routers of the winning recipe '{win}', threshold {p.threshold:.4g}), nats per token, paired "
                    "per block", v, lo, hi, int(p.blocks), above(lo, hi),
                    gt0 + " (positive: MindSkip's loss is lower); winner: the router set placed at every level "
                    "with the lowest mean loss difference from the greedy static drop at equal realised skip, over "
                    "the levels every such set can be compared at", FRONTIER_RUN, role))
        return rows
    for v in [n for n in held.index if n.startswith("mindskip_k")]:
        k = int(held.loc[v, "k"])
        drop = f"static_drop_k{k}"
        if drop not in held.index:
            continue
        d = paired_loss_difference(ev, drop, v)
        a, b = _skipped(held, v), _skipped(held, drop)
        rows.append(_row(
            f"C2 MindSkip beats static attention drop at {a:.2f} vs {b:g} skipped layers (held-out loss)",
            "not reported", f"held-out loss {drop} - {v}, nats per token, paired per block", d.diff, d.ci_low,
            d.ci_high, d.n, equal_skip(above(d.ci_low, d.ci_high), a, b),
            gt0 + " (positive: MindSkip's loss is lower)" + EQUAL_SKIP_RULE, rid))
    return rows


def _beside(run: Path, path: str) -> Path:
    """A path recorded in a run's plan: as written when it exists from here, else relative to
    the kit root the run folder lies in (``<root>/results/runs/<run>``)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return run.resolve().parents[2] / p


def _c5(tuned: Path, routers: Path) -> list[dict]:
    summary_path = tuned / "train" / "summary.json"
    if not summary_path.exists():
        return []
    s = json.loads(summary_path.read_text())
    meta = json.loads((routers / "mindskip_config.json").read_text())
    router_params = len(meta["routed_layers"]) * int(meta["hidden_size"])
    minutes = float(s["wall_time_s"]) / 60
    only_routers = s.get("trainable") == "routers" and int(s.get("trainable_parameters", -1)) == router_params
    verdict = HOLDS if minutes < TUNING_MINUTES and only_routers else FAILS
    return [_row(
        "C5 router-only tuning takes minutes and trains only router weights",
        "under 30 min on one RTX A6000 for an 8B model",
        f"tuning wall time, minutes ({s.get('steps')} steps, {s.get('recipe', s.get('preset'))} recipe); "
        f"{s.get('trainable_parameters')} trainable parameters = {len(meta['routed_layers'])} routers x "
        f"{meta['hidden_size']}", minutes, math.nan, math.nan, int(s.get("steps", 0)), verdict,
        f"holds if wall time < {TUNING_MINUTES:g} min and the trainable parameters are exactly the routers'; "
        "else does not hold", tuned.name)]


def _speed_source(run: Path, tuned: Path, macro: pd.DataFrame) -> tuple[Path, Any]:
    """The profile C6 reads and the macro measures of the operating point it was timed at: the
    evidence run's own ``profile/`` (timed at one of its MindSkip thresholds) when it has one,
    else the tuning run's (timed at the routers' own threshold)."""
    for folder in (run, tuned):
        prof = folder / "profile" / "profile.json"
        if not prof.exists():
            continue
        thr = json.loads(prof.read_text()).get("threshold")
        match = [v for v in macro.index if macro.loc[v, "method"] == "mindskip" and thr is not None
                 and abs(float(macro.loc[v, "threshold"]) - float(thr)) < 1e-9]
        if folder == run and not match:
            continue
        return prof, macro.loc[match[0]] if match else None
    return tuned / "profile" / "profile.json", None


def _c6(prof: Path, op, paper: dict, rid: str) -> list[dict]:
    if not prof.exists():
        return []
    p = json.loads(prof.read_text())
    if op is None:  # the routers' own threshold not scored on the tasks (yet): accuracy unknown
        acc_ok, acc_text = OPEN, "accuracy there not scored yet"
    else:
        acc_ok = at_least(100 * op.acc_ci_low, 100 * op.acc_ci_high, -ACC_MARGIN)
        acc_text = (f"accuracy there (above-chance macro) {100 * op.acc_diff:+.2f} [{100 * op.acc_ci_low:+.2f}, "
                    f"{100 * op.acc_ci_high:+.2f}] points ({acc_ok} under C1's rule)")
    groups: dict = {}
    for m in p["measurements"]:
        groups.setdefault((m["regime"], m["batch_size"], m["seq_len"]), {})[m["variant"]] = m["times_ms"]
    rows = []
    for (regime, bs, L), v in groups.items():
        if "dense" not in v or "mindskip" not in v:
            continue
        sp, lo, hi, n = speedup_interval(v["dense"], v["mindskip"])
        speed = above(lo, hi, 1.0)
        verdict = FAILS if FAILS in (speed, acc_ok) else HOLDS if speed == acc_ok == HOLDS else OPEN
        rows.append(_row(
            f"C6 speedup at an operating point of C1 (threshold {p.get('threshold'):.4g}; {regime}, batch {bs}, "
            f"{L} tokens)",
            f"{paper['speedup']:.2f}x at {paper['attn_seq'] - paper['dense']:+.1f} points (main table, attn/seq)",
            f"dense / MindSkip time, {p.get('dtype')} {p.get('device_name')} {p.get('threads')} thread(s); "
            f"{acc_text}", sp, lo, hi, n, verdict,
            "holds if the speedup's ci_low > 1 and the accuracy there holds under C1's rule; does not hold if "
            "ci_high < 1 or the accuracy does not hold; else inconclusive",
            rid if prof.parents[1].name == rid else f"{rid}, {prof.parents[1].name}"))
    return rows


def to_markdown(table: pd.DataFrame) -> str:
    """The claims as a Markdown table (numbers rounded for reading; the CSV keeps them whole)."""
    shown = table.copy()
    for c in ("kit_value", "ci_low", "ci_high"):
        shown[c] = shown[c].map(lambda x: "" if x != x else f"{x:.3g}")
    head = ("# The paper's claims, decided on the embedded model\n\n"
            "Built by `python -m rt_lib paper` from the evidence run named in `run`; the verdict of each row "
            "follows from its rule applied to its interval (95%).\n\n")
    return head + shown.to_markdown(index=False) + "\n"


def find_evidence_runs(results_root: str | Path) -> list[Path]:
    """Run folders under ``<results_root>/runs`` holding a finished evidence run."""
    root = Path(results_root) / "runs"
    return sorted(p for p in root.glob("*") if (p / "evidence" / "plan.json").exists()
                  and (p / "eval" / "results.json").exists())


def write_claims(results_root: str | Path, out_tables: str | Path, reference_dir=None) -> list[Path]:
    """``claims.csv`` and ``claims.md`` from the newest evidence run (none: nothing written)."""
    from rt_lib import files

    found = find_evidence_runs(results_root)
    if not found:
        return []
    table = build_claims(found[-1], reference_dir)
    out = Path(out_tables)
    return [files.write_csv(out / "claims.csv", table, CLAIM_COLUMNS),
            files.atomic_write_text(out / "claims.md", to_markdown(table))]


__all__ = ["CLAIM_COLUMNS", "HOLDS", "FAILS", "OPEN", "above", "at_least", "build_claims", "find_evidence_runs",
           "speedup_interval", "to_markdown", "write_claims"]
