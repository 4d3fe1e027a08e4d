"""The GPU check (benchmarks/gpu_check.py): its dry run on the CPU (the same code path, tiny
shapes), its time estimate, and the size accounting of `--prepare` (no download here)."""

import csv
import dataclasses
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gc_mod():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses resolve annotations through sys.modules
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def dry_run(gc_mod, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    assert gc_mod.main(["--dry-run", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_dry_run_writes_every_variant_and_point(gc_mod, dry_run):
    assert sorted(p.name for p in dry_run.iterdir()) == ["gpu_check.csv", "gpu_check.json", "summary.txt"]
    report = json.loads((dry_run / "gpu_check.json").read_text())
    s = gc_mod.DRY_RUN
    names = gc_mod.variant_names(s.ks)
    assert names == ["dense", "oracle_1", "mindskip_1", "mask_1", "oracle_2", "mindskip_2", "mask_2"]
    rows = report["rows"]
    expected = {(regime, b, n, v) for regime, b, n in gc_mod.points(s) for v in names}
    assert {(r["regime"], r["batch"], r["context"], r["variant"]) for r in rows} == expected
    assert len(rows) == len(expected) == 8 * 7
    assert {r["status"] for r in rows} == {"ok"}
    assert all(r["speedup"] > 0 and r["median_ms"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert all(r["bound"] >= 1.0 for r in rows)
    assert all(r["samples"] == (s.repeats if r["regime"] == "prefill" else s.decode_rounds * s.decode_steps)
               for r in rows)
    with open(dry_run / "gpu_check.csv") as f:
        table = list(csv.DictReader(f))
    assert len([r for r in table if r["regime"] != "check"]) == len(rows)
    text = (dry_run / "summary.txt").read_text()
    assert "DRY RUN" in text and "mindskip_2" in text and "claim: 1.21x" in text
    assert report["versions"]["transformers"] and report["versions"]["torch"]


def test_claimed_speedup_comes_from_the_reference_data(gc_mod, tmp_path):
    from rt_lib.paper.tables import load_reference

    main = load_reference("main_table")
    row = main[(main.model == "Llama-3-8B") & (main.method == "mindskip") & (main.granularity == "attn")
               & (main.route_level == "seq")]
    assert gc_mod.CLAIM_SPEEDUP == float(row.speedup.iloc[0])
    changed = tmp_path / "main_table.csv"
    changed.write_text(gc_mod.REFERENCE_MAIN_TABLE.read_text().replace("Llama-3-8B,router-tuning,attn,seq,1.21,",
                                                                       "Llama-3-8B,router-tuning,attn,seq,1.5,"))
    assert gc_mod.paper_speedup(changed) == 1.5


def test_dry_run_kv_bytes_drop_by_the_skipped_layers_share(dry_run):
    rows = json.loads((dry_run / "gpu_check.json").read_text())["rows"]
    layers = 4
    for point in {(r["regime"], r["batch"], r["context"]) for r in rows}:
        at = {r["variant"]: r for r in rows if (r["regime"], r["batch"], r["context"]) == point}
        dense = at["dense"]["kv_bytes"]
        assert dense > 0
        for k in (1, 2):
            for v in (f"oracle_{k}", f"mindskip_{k}"):
                assert at[v]["kv_bytes"] * layers == dense * (layers - k), (point, v)
                assert at[v]["kv_saved"] == pytest.approx(k / layers)
            assert at[f"mask_{k}"]["kv_bytes"] == dense  # compute-then-mask stores every layer


def test_dry_run_correctness_checks_pass_and_claim_is_summarised(dry_run):
    report = json.loads((dry_run / "gpu_check.json").read_text())
    checks = report["checks"]
    assert [c["status"] for c in checks] == ["pass"] * 4, checks
    assert {c["check"].split(" (")[0] for c in checks} == {"skip == mask", "cached == uncached"}
    assert {c["check"].split("(")[1].split(" ")[0] for c in checks} == {"seq", "token"}
    claim = {c["regime"]: c for c in report["claim"]}
    assert set(claim) == {"prefill", "decode"} and {c["k"] for c in claim.values()} == {1}  # 1 of 4 layers: 25%


def test_layers_skipped_are_the_last_before_the_final_one(gc_mod):
    assert gc_mod.routed_layers(32) == list(range(15, 31))
    assert gc_mod.skipped_layers(32, 4) == [27, 28, 29, 30]
    assert gc_mod.skipped_layers(32, 8) == list(range(23, 31))
    assert gc_mod.skipped_layers(4, 2) == [1, 2]
    with pytest.raises(ValueError, match="choose 1..16"):
        gc_mod.skipped_layers(32, 17)


def test_estimate_of_the_gpu_run_and_the_budget_guard(gc_mod):
    shape = gc_mod.Shape.from_dict(gc_mod.read_config())
    assert shape.params == 8_030_261_248  # Llama-3-8B (README, the plan's meta-device count)
    est = gc_mod.estimate(shape, gc_mod.GPU)
    assert len(est["points"]) == 8 and est["total_s"] <= gc_mod.GPU.budget_s
    prefill = est["points"][0]
    assert prefill["forward_ms"] == pytest.approx(2 * shape.layer_params * 2048 / 700e12 * 1e3
                                                  + 2 * 4096 * 128256 / 700e12 * 1e3
                                                  + 4 * 32 * 2048**2 * 4096 / 2 / 700e12 * 1e3)
    tight, notes = gc_mod.fit_budget(shape, dataclasses.replace(gc_mod.GPU, budget_s=60.0))
    assert tight.repeats < gc_mod.GPU.repeats and notes
    assert gc_mod.estimate(shape, tight)["total_s"] < est["total_s"]


def test_prepare_size_accounting_refuses_over_64_mib(gc_mod, tmp_path):
    mib = 2**20
    assert gc_mod.carry_budget({}, 53 * mib)["fits"]
    ok = gc_mod.carry_budget({"a.whl": 5 * mib, "b.whl": 6 * mib}, 53 * mib)
    assert ok["fits"] and ok["total_bytes"] == 64 * mib and ok["wheel_bytes"] == 11 * mib
    over = gc_mod.carry_budget({"transformers-5.24.0-py3-none-any.whl": 13_549_890}, 53_677_645)
    assert not over["fits"] and over["room_bytes"] < 0
    # a folder of wheels (sparse files: sizes without disk use)
    for name, size in (("x-1.0-py3-none-any.whl", 40 * mib), ("y-2.0-py3-none-any.whl", 20 * mib)):
        with open(tmp_path / name, "wb") as f:
            f.truncate(size)
    (tmp_path / "RUN_COMMAND.txt").write_text("old\n")
    sizes = gc_mod.wheel_sizes(tmp_path)
    assert sizes == {"x-1.0-py3-none-any.whl": 40 * mib, "y-2.0-py3-none-any.whl": 20 * mib}
    assert not gc_mod.carry_budget(sizes, 5 * mib)["fits"]
    assert gc_mod.carry_budget(sizes, 4 * mib)["fits"]


def test_prepare_without_wheels_writes_the_run_command(gc_mod, tmp_path, capsys):
    whl = tmp_path / ".whl"
    assert gc_mod.prepare(whl_dir=whl, tree=10 * 2**20) == 0
    line = (whl / "RUN_COMMAND.txt").read_text().strip()
    assert line == "export PYTHONPATH=. && PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT/gpu-check"
    printed = capsys.readouterr().out
    assert "wheels carried: none" in printed and "fits the 64 MiB limit" in printed and line in printed
    # over the limit: refused, and no command is left behind
    assert gc_mod.prepare(whl_dir=whl, tree=65 * 2**20) == 1
    assert not (whl / "RUN_COMMAND.txt").exists()
    captured = capsys.readouterr()
    assert "does NOT fit the 64 MiB limit (over by 1.00 MiB)" in captured.out
    assert "the working tree alone is over the limit" in captured.err


def test_run_command_installs_carried_wheels_first(gc_mod):
    line = gc_mod.run_command(True)
    assert line.startswith("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
                           "--target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:. && ")
    assert line.endswith("python3 benchmarks/gpu_check.py --out $OUT/gpu-check")


def test_tree_bytes_counts_tracked_and_untracked_files(gc_mod):
    total = gc_mod.tree_bytes(ROOT)
    assert total >= os.path.getsize(ROOT / "benchmarks" / "gpu_check.py") + os.path.getsize(ROOT / "README.md")


def test_transformers_version_parsing(gc_mod):
    v = gc_mod._version_tuple
    assert v("5.17.0") == (5, 17, 0) and v("5.24.0.dev0") == (5, 24, 0) and v("5.3.0+cu") == (5, 3, 0)
    assert v("4.57.1") < gc_mod.MIN_TRANSFORMERS <= v("5.17.0")


def test_the_real_check_needs_a_gpu(gc_mod, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    with pytest.raises(SystemExit, match="--dry-run runs the same code on a CPU"):
        gc_mod.main(["--out", str(tmp_path / "never-written")])
    assert not (tmp_path / "never-written").exists()
