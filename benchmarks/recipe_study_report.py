"""Markdown tables of the router recipe study from the committed tables (for docs/recipe_study.md):

    python benchmarks/recipe_study_report.py [results/tables]

1. one row per recipe: budget, wall time, collapse, mean difference from both static drops at
   equal realised skip (``router_recipes.csv``); 2. every router point (``router_frontier.csv``).
"""

import sys
from pathlib import Path

import pandas as pd

from rt_lib.evidence.frontier import recipe_scores, winning_recipe


def ci(v, lo, hi) -> str:
    return "" if pd.isna(v) else f"{v:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def main(folder: str = "results/tables") -> None:
    fr = pd.read_csv(Path(folder) / "router_frontier.csv")
    rec = pd.read_csv(Path(folder) / "router_recipes.csv")
    cpu_tokens = int(rec.loc[rec.recipe == "cpu", "tokens"].iloc[0])
    fits = list(rec.loc[rec.tokens == cpu_tokens, "recipe"])
    print(f"winner: {winning_recipe(fr)}; within the main job's budget ({cpu_tokens:,} tokens): "
          f"{winning_recipe(fr, among=fits)}\n")
    print("| recipe | steps x tokens | tuning wall (s) | capacity: lowest / final | collapsed | "
          "mean vs greedy drop | mean vs importance drop | levels |")
    print("|---|---|---|---|---|---|---|---|")
    scores = recipe_scores(fr)
    for _, r in rec.sort_values("recipe").iterrows():
        s = scores.loc[r.recipe] if r.recipe in scores.index else None
        mean = ("", "", "one level only" if r.recipe.startswith("target-k") else "") if s is None else (
            f"{s.mean_vs_greedy:+.3f}", f"{s.mean_vs_importance:+.3f}", s.levels)
        print(f"| {r.recipe} | {int(r.steps)} x {int(r.tokens) // int(r.steps):,} | {r.wall_time_s:.0f} | "
              f"{r.min_mean_capacity:.3f} / {r.final_mean_capacity:.3f} | {'yes' if r.collapsed else 'no'} | "
              f"{mean[0]} | {mean[1]} | {mean[2]} |")
    print("\n| routers | point | skipped layers | loss increase [95% CI] | vs greedy drop | vs importance drop "
          "| static layers | patterns |")
    print("|---|---|---|---|---|---|---|---|")
    ms = fr[fr.family.str.startswith("mindskip:")].copy()
    ms["name"] = ms.family.str.split(":", n=1).str[1]
    for _, p in ms.sort_values(["name", "skipped"]).iterrows():
        vs_g = ci(p.vs_greedy_equal_skip, p.vs_greedy_ci_low, p.vs_greedy_ci_high) or "beyond the static curves"
        vs_i = ci(p.vs_importance_equal_skip, p.vs_importance_ci_low, p.vs_importance_ci_high)
        point = p.point.rsplit("__", 1)[1]
        print(f"| {p['name']} | {point} | {p.skipped:.2f} | {ci(p.loss_increase, p.ci_low, p.ci_high)} | {vs_g} | "
              f"{vs_i} | {int(p.static_layers)} | {int(p.patterns)} |")
    st = fr[fr.family.str.startswith("static")]
    print("\n| static drop | " + " | ".join(f"k{int(k)}" for k in sorted(st.target_skipped.dropna().unique())) + " |")
    print("|---|" + "---|" * st.target_skipped.nunique())
    for fam, d in st.groupby("family"):
        d = d.sort_values("target_skipped")
        print(f"| {fam.replace('static_', '')} | " + " | ".join(ci(r.loss_increase, r.ci_low, r.ci_high)
                                                              for _, r in d.iterrows()) + " |")


if __name__ == "__main__":
    main(*sys.argv[1:])
