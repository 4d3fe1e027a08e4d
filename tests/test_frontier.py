"""The router recipe study: frontier points, equal-skip comparisons, the winner rule, the recipe
table, and the claims' rules for above-chance tasks and unequal realised skip."""

import csv
import json

import numpy as np
import pandas as pd
import pytest
import torch

from rt_lib.paper import claims
from rt_lib.evidence.frontier import (Frontier, frontier_table, input_dependence, recipe_scores, static_at,
                                     winning_recipe)
from rt_lib.tuning.router_study import STUDY_RECIPES, recipe_table
from rt_lib.tuning.config import make_config


def _part(folder, name, **d):
    (folder / "parts").mkdir(parents=True, exist_ok=True)
    (folder / "parts" / f"{name}.json").write_text(json.dumps({"part": name, **d}))


def test_static_at_interpolates_per_block_between_whole_layer_counts():
    parts = {0: np.array([1.0, 2.0]), 2: np.array([3.0, 2.0]), 4: np.array([5.0, 6.0])}
    assert np.allclose(static_at(parts, 3.0), [4.0, 4.0])
    assert np.allclose(static_at(parts, 2.0), [3.0, 2.0])
    assert static_at(parts, 4.5) is None
    assert np.allclose(static_at(parts, 4.1), [5.0, 6.0])  # within the calibration tolerance of the top


def test_input_dependence_counts_static_layers_and_patterns():
    keep = [[True, False, True]] * 19 + [[True, True, False]]
    dep = input_dependence(keep, [13, 14, 15])
    assert dep["static_layers"] == [13, 14, 15] and dep["patterns"] == 2
    dep = input_dependence([[True, False]] * 10 + [[False, True]] * 10, [5, 6])
    assert dep["static_layers_n"] == 0 and dep["patterns"] == 2


def test_frontier_table_pairs_every_point_with_dense_and_with_static_at_equal_skip(tmp_path):
    dense = [3.0, 3.2, 3.4, 3.1]
    _part(tmp_path, "dense", family="dense", k=0, losses=dense)
    for fam in ("static_greedy", "static_importance"):
        step = 0.1 if fam == "static_greedy" else 0.2
        for k in (2, 4):
            _part(tmp_path, f"{fam}__k{k}", family=fam, k=k, layers=list(range(k)),
                  losses=[x + step * k for x in dense])
    # routers skipping 3 of 4 routed layers on two blocks, 2 on the others: 2.5 on average
    keep = [[False, False, False, True], [False, False, False, True], [False, False, True, True],
            [False, False, True, True]]
    _part(tmp_path, "mindskip-a__k2", family="mindskip:a", k=2, threshold=0.49, routed_layers=[1, 2, 3, 4],
          keep=keep, losses=[x + 0.2 for x in dense])
    _part(tmp_path, "mindskip-b__k2", family="mindskip:b", k=2, threshold=0.49, routed_layers=[1, 2, 3, 4],
          keep=keep, losses=[x + 0.4 for x in dense])
    rows = {r["point"]: r for r in frontier_table(tmp_path, num_layers=10)}
    a = rows["mindskip-a__k2"]
    assert a["skipped"] == 2.5 and a["skipped_share"] == 0.25 and a["loss_increase"] == pytest.approx(0.2)
    # greedy at 2.5 layers: +0.25 per block; importance: +0.5
    assert a["vs_greedy_equal_skip"] == pytest.approx(-0.05) and a["vs_importance_equal_skip"] == pytest.approx(-0.3)
    assert a["static_layers"] == 3 and a["patterns"] == 2
    assert rows["static_greedy__k4"]["loss_increase"] == pytest.approx(0.4)
    assert winning_recipe(list(rows.values())) == "a"


def test_calibration_guided_by_dense_scores_stops_within_the_tolerance():
    """On a tiny model with random routers: the score-guided search lands within the tolerance in
    fewer measured points than plain bisection needs, at a threshold that really skips that much."""
    from rt_lib.evidence import calibration as run
    from rt_lib.mindskip.config import MindSkipConfig
    from rt_lib.mindskip.model import get_mindskip_model
    from tests.test_train import tiny_llama
    from tests.tiny_models import random_routers

    model, _ = tiny_llama(layers=6)
    ms = get_mindskip_model(model, MindSkipConfig(num_routed_layers=4))
    random_routers(ms, seed=3, scale=8.0)
    g = torch.Generator().manual_seed(0)
    blocks = [{"input_ids": (ids := torch.randint(3, 250, (24,), generator=g).tolist()), "labels": ids} for _ in range(24)]
    try:
        exact = run.calibrate_threshold(ms, blocks, 2, 1.4, steps=14)  # 1.4 x 24 blocks: not reachable exactly
        near = run.calibrate_threshold(ms, blocks, 2, 1.4, steps=14, tolerance=0.1)
        assert len(exact["trace"]) == 14
        assert abs(near["skipped"] - 1.4) <= 0.1 and len(near["trace"]) < 6
        ms.set_threshold(near["threshold"])
        assert run.skipped_layers(ms, blocks, 2) == pytest.approx(near["skipped"])
        # the count runs the decoder without its LM head: the same decisions as the whole model's
        ms.reset_stats()
        with torch.no_grad():
            ms(input_ids=torch.tensor([b["input_ids"] for b in blocks]))
        assert sum(1.0 - c for c in ms.capacities().values()) == pytest.approx(near["skipped"])
    finally:
        ms.unload()


def test_winner_must_cover_every_level_and_is_judged_at_equal_skip():
    rows = [{"family": "mindskip:a", "target_skipped": 2, "loss_increase": 0.1, "vs_greedy_equal_skip": 0.02},
            {"family": "mindskip:a", "target_skipped": 4, "loss_increase": 0.3, "vs_greedy_equal_skip": 0.04},
            {"family": "mindskip:b", "target_skipped": 2, "loss_increase": 0.05, "vs_greedy_equal_skip": -0.1},
            # c: lower loss increases than a, but only because it skipped less than a at each level
            {"family": "mindskip:c", "target_skipped": 2, "loss_increase": 0.05, "vs_greedy_equal_skip": 0.05},
            {"family": "mindskip:c", "target_skipped": 4, "loss_increase": 0.2, "vs_greedy_equal_skip": 0.06},
            {"family": "static_greedy", "target_skipped": 2, "loss_increase": 0.0, "vs_greedy_equal_skip": None}]
    assert winning_recipe(rows) == "a"  # b: one level only
    assert winning_recipe(rows, among=["c"]) == "c" and winning_recipe(rows, among=["b"]) is None
    # d wins on the level both can be compared at; its level-4 point skipped beyond the static curves
    rows += [{"family": "mindskip:d", "target_skipped": 2, "loss_increase": 0.1, "vs_greedy_equal_skip": 0.0},
             {"family": "mindskip:d", "target_skipped": 4, "loss_increase": 0.9, "vs_greedy_equal_skip": None}]
    assert winning_recipe(rows) == "d"
    scores = recipe_scores(rows)
    assert list(scores.index) == ["d", "a", "c"] and set(scores.levels) == {"2"}
    assert scores.loc["a", "mean_vs_greedy"] == pytest.approx(0.02)


@pytest.mark.parametrize("verdict, fav, other, want", [
    (claims.HOLDS, 4.4, 4.0, claims.HOLDS),     # wins while skipping more: stands
    (claims.HOLDS, 3.6, 4.0, claims.OPEN),      # wins while skipping less: not at equal skip
    (claims.FAILS, 4.4, 4.0, claims.OPEN),      # loses while skipping more: not at equal skip
    (claims.FAILS, 3.6, 4.0, claims.FAILS),     # loses while skipping less: stands
    (claims.FAILS, 4.05, 4.0, claims.FAILS),    # within the tolerance: equal skip
    (claims.HOLDS, float("nan"), 4.0, claims.OPEN)])
def test_equal_skip_rule(verdict, fav, other, want):
    assert claims.equal_skip(verdict, fav, other) == want


def test_above_chance_tasks_come_from_dense_flags_only():
    m = pd.DataFrame({"task": ["a", "b", "c", "macro_avg"], "above_chance": [True, False, True, None]})
    assert claims.above_chance_tasks(m) == ["a", "c"]


def test_recipe_table_flags_a_collapsed_log(tmp_path):
    for name, caps in (("cpu", [1.0, 1.0, 0.0, 0.3, 0.45]), ("gradual", [1.0, 0.9, 0.7, 0.55, 0.5])):
        train = tmp_path / f"recipe-{name}" / "train"
        train.mkdir(parents=True)
        (train / "summary.json").write_text(json.dumps({"finished": True, "steps": 5, "config": {"lr": 1e-3},
                                                        "train_config": {"target_anneal": 0.5 if name == "gradual" else 0.0},
                                                        "heldout_lm_loss": {"dense": 3.4, "tuned": 3.9}}))
        with open(train / "log.csv", "w", newline="") as f:
            w = csv.DictWriter(f, ["step", "mean_capacity", "tokens"])
            w.writeheader()
            w.writerows({"step": i + 1, "mean_capacity": c, "tokens": 100 * (i + 1)} for i, c in enumerate(caps))
    rows = {r["recipe"]: r for r in recipe_table(tmp_path)}
    assert rows["cpu"]["collapsed"] and rows["cpu"]["collapse_step"] == 3
    assert not rows["gradual"]["collapsed"] and rows["gradual"]["tokens"] == 500
    assert rows["gradual"]["target_anneal"] == 0.5 and rows["cpu"]["target_anneal"] == 0.0


def test_every_recipe_is_a_valid_training_configuration():
    for name, (overrides, what) in STUDY_RECIPES.items():
        cfg = make_config("cpu", **{k: v for k, v in overrides.items() if k != "save_every"})
        assert what and cfg.mindskip_config()


def test_frontier_run_on_a_tiny_model(tmp_path):
    """End to end on a tiny random Llama with the byte tokenizer: every part written, the table
    has each family, and a second run recomputes nothing."""
    from rt_lib.mindskip.config import MindSkipConfig
    from rt_lib.tuning.data import byte_tokenizer
    from rt_lib.mindskip.model import get_mindskip_model
    from tests.test_train import tiny_llama
    from tests.tiny_models import random_routers

    import shutil

    model, tok = tiny_llama(layers=6)
    ms = get_mindskip_model(model, MindSkipConfig(num_routed_layers=4))
    random_routers(ms, seed=1, scale=40.0)
    ms.save_pretrained(tmp_path / "routers")
    ms.unload()
    shutil.copytree(tmp_path / "routers", tmp_path / "twin")  # another recipe that tuned the same routers

    def frontier(routers=tmp_path / "routers"):
        fr = Frontier(tmp_path / "fr", {"r": routers, "t": tmp_path / "twin@2"}, levels=[1, 2], heldout_blocks=6,
                      calibration_blocks=4, greedy_blocks=2, bisection_steps=6, batch_size=3)
        fr._base, fr._tok = model, byte_tokenizer()
        return fr

    frontier().run()
    parts = sorted(p.stem for p in (tmp_path / "fr" / "frontier" / "parts").glob("*.json"))
    assert parts == ["dense", "greedy", "importance", "mindskip-r__k1", "mindskip-r__k2", "mindskip-r__own",
                     "mindskip-t__k2",  # a set placed at one level has no point at its own threshold
                     "static_greedy__k1", "static_greedy__k2", "static_importance__k1", "static_importance__k2"]
    read = lambda p: json.loads((tmp_path / "fr" / "frontier" / "parts" / f"{p}.json").read_text())  # noqa: E731
    r2, t2 = read("mindskip-r__k2"), read("mindskip-t__k2")
    assert t2["same_routers_as"] == "r" and t2["losses"] == r2["losses"] and t2["family"] == "mindskip:t"
    assert r2["calibration_steps"] <= 6 and r2["calibration_tolerance"] == pytest.approx(0.125)
    # the same routers moved to another folder continue the run; other weights under the name are refused
    moved = shutil.copytree(tmp_path / "routers", tmp_path / "moved")
    frontier(moved).run()
    ms = get_mindskip_model(model, MindSkipConfig(num_routed_layers=4))
    random_routers(ms, seed=2, scale=40.0)
    ms.save_pretrained(tmp_path / "other")
    ms.unload()
    with pytest.raises(ValueError, match="other settings"):
        frontier(tmp_path / "other").run()
    stamps = {p: (tmp_path / "fr" / "frontier" / "parts" / f"{p}.json").stat().st_mtime_ns for p in parts}
    table = pd.read_csv(frontier().run())
    assert {p: (tmp_path / "fr" / "frontier" / "parts" / f"{p}.json").stat().st_mtime_ns for p in parts} == stamps
    assert set(table.family) == {"mindskip:r", "mindskip:t", "static_greedy", "static_importance"}
    greedy = json.loads((tmp_path / "fr" / "frontier" / "parts" / "greedy.json").read_text())
    assert len(greedy["order"]) == 2 and greedy["order"][:1] == json.loads(
        (tmp_path / "fr" / "frontier" / "parts" / "static_greedy__k1.json").read_text())["layers"]


def test_c2_on_held_out_loss_comes_from_a_complete_frontier_with_the_winning_routers(tmp_path):
    """While the frontier lacks a point, C2's held-out rows come from the evidence run; once it is
    complete, from the winning router set at the paper's two operating points (4 and 8 layers),
    against both static drops at equal realised skip."""
    fr = tmp_path / "router-frontier" / "frontier"
    dense = [3.0, 3.2, 3.4, 3.1, 3.3, 3.0]
    _part(fr, "dense", family="dense", k=0, losses=dense)
    for fam, step in (("static_greedy", 0.05), ("static_importance", 0.1)):
        for k in (4, 8):
            _part(fr, f"{fam}__k{k}", family=fam, k=k, layers=list(range(k)), losses=[x + step * k for x in dense])
    routers = {"good": 0.2, "bad": 0.5}  # per-layer loss cost of each set
    (fr / "plan.json").write_text(json.dumps({"levels": [4, 8], "num_layers": 30, "routers": {
        n: {"path": n, "weights_sha256": n, "levels": None} for n in routers}}))
    keep = lambda k: [[False] * k + [True] * (16 - k)] * len(dense)  # noqa: E731
    for name, cost in routers.items():
        for k in (4, 8):
            _part(fr, f"mindskip-{name}__k{k}", family=f"mindskip:{name}", k=k, threshold=0.5, routed_layers=list(
                range(13, 29)), keep=keep(k), losses=[x + cost * k + 0.01 * i for i, x in enumerate(dense)])
    from rt_lib.files import write_csv

    write_csv(fr / "frontier.csv", frontier_table(fr, num_layers=30))
    run = tmp_path / "evidence"
    args = (run, run, pd.DataFrame(), {"c2": {4: 5.4, 8: 6.3}}, "holds if ci_low > 0", "evidence")
    assert claims._c2_heldout(*args) == []  # own-threshold points missing: the evidence run decides
    for name, cost in routers.items():
        _part(fr, f"mindskip-{name}__own", family=f"mindskip:{name}", k=None, threshold=0.5,
              routed_layers=list(range(13, 29)), keep=keep(6), losses=[x + cost * 6 for x in dense])
    write_csv(fr / "frontier.csv", frontier_table(fr, num_layers=30))
    rows = claims._c2_heldout(*args)
    assert len(rows) == 4 and all("'good'" in r["measure"] for r in rows)
    by = {(r["role"], "4.00 of 30" in r["claim"]): r for r in rows}
    # at 4 layers: greedy +0.2, the good routers +0.8: MindSkip's loss is 0.6 higher, and so on
    assert by[("secondary", True)]["kit_value"] == pytest.approx(-(0.2 * 4 - 0.05 * 4 + 0.025), abs=1e-9)
    assert by[("primary", False)]["kit_value"] == pytest.approx(-(0.2 * 8 - 0.1 * 8 + 0.025), abs=1e-9)
    assert all(r["verdict"] == "does not hold" and r["run"] == "router-frontier" for r in rows)
