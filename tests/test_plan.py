"""The plan (rt_lib.pipeline.plan): Llama-3-8B shapes from a config-only folder, memory formulas checked
against what torch really allocates and saves on small models, missing assets listed with the
command that fetches them, and the exit status."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf

from rt_lib.pipeline import plan as P
from rt_lib.pipeline import plan_assets
from rt_lib.pipeline import plan_memory
from rt_lib.pipeline import plan_report
from rt_lib.mindskip.config import MindSkipConfig
from rt_lib.tuning.heldout import lm_loss_sum
from rt_lib.mindskip.model import get_mindskip_model

ROOT = Path(__file__).resolve().parents[1]
LLAMA3 = ROOT / "tests" / "fixtures" / "llama3-8b-config"
GiB = 2**30


@pytest.fixture(scope="module")
def llama3_plan():
    return P.make_plan("paper", model=str(LLAMA3), gpu_memory="24GiB")


def _env(**extra):
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", **extra}


# ----------------------------------------------------------------------------- Llama-3-8B shapes
def test_llama3_parameters_weights_and_routers(llama3_plan):
    m, t = llama3_plan["model"], llama3_plan["train"]
    assert m["kind"] == "local folder" and m["config"] == "ok"
    assert m["shape"] == {"architecture": "LlamaForCausalLM", "layers": 32, "hidden": 4096, "heads": 32, "kv_heads": 8,
                          "head_dim": 128, "intermediate": 14336, "vocab": 128256, "max_positions": 8192,
                          "tie_word_embeddings": False}
    assert m["parameters"] == 8_030_261_248
    assert m["weights_bytes"] == 2 * 8_030_261_248 and m["dtype"] == "bfloat16"
    assert round(m["weights_bytes"] / 1e9, 2) == 16.06
    # routers: the 16 deepest layers but the last, one 4096-vector each, float32
    assert t["routed_layers"] == list(range(15, 31))
    assert t["router_parameters"] == 16 * 4096
    assert t["router_bytes"] == {"weights": 16 * 4096 * 4, "gradients": 16 * 4096 * 4, "adamw_state": 2 * 16 * 4096 * 4}
    assert t["trainable_parameters"] == 16 * 4096
    # logits of one micro batch in float32: 2 x 2048 x 128256 x 4 bytes
    assert t["logits_bytes"] == 2 * 2048 * 128256 * 4
    assert t["batches"]["accumulation"] == 32 and t["batches"]["steps"] == 15
    assert t["total_bytes"] == (t["weights_bytes"] + t["activations"]["bytes"] + t["loss_working_set_bytes"]
                                + sum(t["trainable_bytes"].values()))
    assert t["fits"] is False  # about 33.6 GB does not fit 24 GiB
    # a tokenizer that is not the model's is reported, not fatal
    assert m["tokenizer_tokens"] == 259
    assert any("259 tokens" in n and "128,256" in n for n in m["notes"])


def test_llama3_kv_bytes_and_full_grid_fit(llama3_plan):
    p = llama3_plan["profile"]
    assert p["grid"] == "full" and p["dtype"] == "bfloat16"
    assert len(p["points"]) == 4 * 4 + 4 * 3  # prefill 4 batches x 4 lengths, decode 4 x 3
    point = next(r for r in p["points"] if (r["regime"], r["batch_size"], r["seq_len"]) == ("decode", 8, 2048))
    tokens = 8 * (2048 + 64)
    assert point["tokens"] == tokens
    assert point["kv_bytes"] == 2 * 32 * 8 * 128 * tokens * 2
    assert point["kv_bytes_skip"] == 2 * (32 - 8) * 8 * 128 * tokens * 2  # 8 attention layers skipped
    fits = {(r["regime"], r["batch_size"], r["seq_len"]): r["fits"] for r in p["points"]}
    assert fits[("prefill", 1, 128)] is True
    assert fits[("decode", 128, 8192)] is False  # 129 GiB of keys and values alone
    free = 24 * GiB - 2 * 8_030_261_248
    assert p["not_fitting"] == sum(r["estimate_bytes"] > p["headroom"] * free for r in p["points"]) > 0
    assert 0 < p["not_fitting"] < len(p["points"])


def test_llama3_missing_assets_have_commands(llama3_plan):
    missing = {x["asset"]: x for x in llama3_plan["missing"]}
    weights = missing[f"weights of {LLAMA3}"]
    assert weights["needed_by"] == "run" and str(LLAMA3) in weights["command"]
    data = missing["tuning data tatsu-lab/alpaca"]
    assert data["command"] == "python -c \"import datasets; datasets.load_dataset('tatsu-lab/alpaca', split='train')\""
    arc = missing["task data arc_challenge (allenai/ai2_arc/ARC-Challenge)"]
    assert "load_dataset('allenai/ai2_arc', 'ARC-Challenge')" in arc["command"]
    assert llama3_plan["eval"]["tokens"]["status"] == "needs the task data"
    assert all(x["command"] for x in llama3_plan["missing"])


def test_llama3_text_output(llama3_plan):
    text = plan_report.format_plan(llama3_plan)
    for line in ("parameters   8,030,261,248 (8.03 B)", "weights      16.06 GB (14.96 GiB) in bfloat16",
                 "16 layers (15..30) x 4096 = 65,536 parameters", "does NOT fit 24.00 GiB",
                 f"{llama3_plan['profile']['not_fitting']} of 28 points do not fit 24.00 GiB",
                 "needs the task data", "hf download tatsu-lab/alpaca --repo-type dataset"):
        assert line in text, line


@pytest.mark.slow
def test_cli_writes_the_same_plan_as_json(tmp_path):
    out = tmp_path / "plan.json"
    proc = subprocess.run([sys.executable, "-m", "rt_lib", "plan", "--preset", "paper", "--model", str(LLAMA3),
                           "--gpu-memory", "24GiB", "--json", str(out)], env=_env(), capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    plan = json.loads(out.read_text())
    assert plan["model"]["parameters"] == 8_030_261_248
    assert plan["gpu_memory"]["bytes"] == 24 * GiB
    assert "8,030,261,248" in proc.stdout and f"wrote {out}" in proc.stdout


# ----------------------------------------------------------------------------- missing model, offline
@pytest.mark.slow
def test_offline_hub_model_not_cached_still_plans(tmp_path):
    """A hub id with an empty Hugging Face cache and HF_HUB_OFFLINE=1: exit 0, the plan lists the
    config/tokenizer and the weights with the commands that fetch them."""
    out = tmp_path / "plan.json"
    env = _env(HF_HOME=str(tmp_path / "hf-home"))
    proc = subprocess.run([sys.executable, "-m", "rt_lib", "plan", "--preset", "paper", "--model",
                           "meta-llama/Meta-Llama-3-8B", "--json", str(out)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    plan = json.loads(out.read_text())
    assert plan["model"]["config"] == "missing" and "parameters" not in plan["model"]
    missing = {x["asset"]: x for x in plan["missing"]}
    cfg = missing["config.json and tokenizer of meta-llama/Meta-Llama-3-8B"]
    assert cfg["needed_by"] == "plan" and "HF_HUB_OFFLINE is set" in cfg["why"]
    assert cfg["command"] == ("hf download meta-llama/Meta-Llama-3-8B --include config.json --include "
                              "generation_config.json --include 'tokenizer*' --include special_tokens_map.json")
    assert "snapshot_download('meta-llama/Meta-Llama-3-8B'" in cfg["alternative"]
    weights = missing["weights of meta-llama/Meta-Llama-3-8B"]
    assert weights["command"] == "hf download meta-llama/Meta-Llama-3-8B --exclude 'original/*'"
    assert plan["profile"]["status"] == "needs the model config" and len(plan["profile"]["points"]) == 28
    assert cfg["command"] in proc.stdout and "Missing assets" in proc.stdout


def test_bad_input_exits_2(capsys):
    from rt_lib.cli.plan import main

    assert main(["--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert main(["--preset", "paper", "--gpu-memory", "lots"]) == 2
    assert "cannot read the memory size" in capsys.readouterr().err
    assert main(["--model", "./no/such/folder"]) == 2


@pytest.mark.parametrize("param,message", [
    ('02_evaluation.task_set="fast"', "unknown task set 'fast'; task sets: paper, offline, quick"),
    ('03_speedup_profiling.profile_grid="huge"', "unknown profile grid 'huge'; grids: smoke, quick, full"),
    ('01_router_tuning.recipe="gpu"', "unknown recipe 'gpu'; recipes: ['cpu', 'paper', 'smoke']"),
])
def test_an_unknown_task_set_grid_or_recipe_is_bad_input(capsys, param, message):
    from rt_lib.cli.reproduce import main

    assert main(["--preset", "smoke", "--plan", "--eval-tokens", "no", "-p", param]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_a_skip_count_beyond_the_models_layers_is_refused_not_a_negative_kv(capsys):
    from rt_lib.cli.reproduce import main
    from rt_lib.speed.roofline import Shape, estimate_kv_bytes

    assert main(["--preset", "smoke", "--plan", "-p", "03_speedup_profiling.skip_k=9"]) == 2
    assert "skip_k=9 is not below the model's 4 layers" in capsys.readouterr().err
    with pytest.raises(ValueError, match="0..4"):
        estimate_kv_bytes(Shape(4, 64, 4, 2, 16, 128, 512), 10, 2, layers=-5)


@pytest.mark.parametrize("text,expected", [("80GiB", 80 * GiB), ("48GB", 48 * 10**9), ("24 GiB", 24 * GiB),
                                           ("80G", 80 * GiB), ("1.5TB", 1_500_000_000_000), ("512MiB", 512 * 2**20)])
def test_parse_memory(text, expected):
    assert P.parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "80 parsecs", "-3GB", "0GB"])
def test_parse_memory_refuses(text):
    with pytest.raises(plan_assets.PlanInputError):
        P.parse_memory(text)


# ----------------------------------------------------------------------------- the --plan flags
def test_train_plan_flag_takes_the_training_options(tmp_path):
    from rt_lib.cli.train import main

    out = tmp_path / "plan.json"
    assert main(["--recipe", "paper", "--plan", "--model", str(LLAMA3), "--micro-batch-size", "1",
                 "--gpu-memory", "48GB", "--plan-json", str(out)]) is None
    plan = json.loads(out.read_text())
    assert (plan["preset"], plan["recipe"]) == ("paper", "paper")  # the pipeline preset that tunes the recipe
    t = plan["train"]
    assert t["recipe_file"] == "rt_lib/tuning/recipes/paper.json"
    assert t["batches"]["micro_batch_size"] == 1 and t["batches"]["accumulation"] == 64
    assert t["activations"]["tokens"] == 2048
    assert t["logits_bytes"] == 2048 * 128256 * 4
    assert t["fits"] is True  # about 24.8 GB with one sequence per micro batch
    with pytest.raises(SystemExit) as e:
        main(["--recipe", "paper", "--gpu-memory", "48GB"])  # a plan flag without --plan
    assert e.value.code == 2


def test_train_plan_of_each_recipe_uses_the_preset_that_tunes_it(capsys):
    from rt_lib.cli.train import main

    for recipe in ("smoke", "cpu", "paper"):
        assert P.preset_for_recipe(recipe) == recipe
    assert main(["--preset", "smoke", "--plan", "--plan-json", "-", "--eval-tokens", "no"]) is None  # the old flag
    out, err = capsys.readouterr()
    assert err.strip() == "note: --preset is deprecated, use --recipe"
    plan = json.loads(out)
    assert (plan["preset"], plan["recipe"], plan["eval"]["task_set"], plan["profile"]["grid"]) == (
        "smoke", "smoke", "quick", "smoke")


def test_reproduce_plan_flag_takes_notebook_overrides(tmp_path):
    from rt_lib.cli.reproduce import main

    out = tmp_path / "plan.json"
    assert main(["--preset", "paper", "--plan", "-p", f'01_router_tuning.model="{LLAMA3}"',
                 "-p", '03_speedup_profiling.profile_grid="quick"', "--gpu-memory", "80GiB",
                 "--plan-json", str(out)]) == 0
    plan = json.loads(out.read_text())
    assert plan["model"]["parameters"] == 8_030_261_248
    from rt_lib.speed.profiling import grid, grid_points

    quick = grid_points(grid("quick"))
    assert plan["profile"]["grid"] == "quick"
    assert [(r["regime"], r["batch_size"], r["seq_len"]) for r in plan["profile"]["points"]] == quick
    assert plan["profile"]["not_fitting"] == 0
    assert not (ROOT / "results" / "runs" / "None").exists()


# ----------------------------------------------------------------------------- formulas vs torch
def _small_llama(dtype=torch.float32):
    cfg = tf.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    cfg._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return tf.LlamaForCausalLM(cfg).to(dtype), cfg


def _saved_bytes(granularity, route_level, dtype=torch.float32, batch=2, seq=64):
    """Bytes autograd keeps for backward in one Router-Tuning forward (model, then the loss)."""
    model, cfg = _small_llama(dtype)
    ms = get_mindskip_model(model, MindSkipConfig(num_routed_layers=4, granularity=granularity,
                                                  route_level=route_level))
    ms.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params:
            seen[key] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, 512, (batch, seq), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        model_bytes = sum(seen.values())
        lm_loss_sum(logits, ids).backward()
    return model_bytes / (batch * seq), ms.routed_layers, cfg


@pytest.mark.parametrize("granularity,route_level,dtype,tolerance", [
    ("attn", "seq", torch.float32, 0.02), ("attn", "seq", torch.bfloat16, 0.02), ("attn", "token", torch.float32, 0.05),
    ("mlp", "seq", torch.float32, 0.02), ("block", "seq", torch.float32, 0.02), ("block", "token", torch.float32, 0.1),
])
def test_activation_estimate_matches_saved_tensors(granularity, route_level, dtype, tolerance):
    measured, routed, cfg = _saved_bytes(granularity, route_level, dtype)
    nbytes = torch.finfo(dtype).bits // 8
    est = plan_memory.activation_bytes_per_token(plan_memory.model_shape(cfg), routed, granularity, route_level, nbytes, seq_len=64)
    assert est["layers_keeping"] == 6 - routed[0]
    assert est["per_token"] == pytest.approx(measured, rel=tolerance)


def test_kv_formula_matches_a_real_cache():
    from rt_lib.speed.roofline import Shape, estimate_kv_bytes
    from rt_lib.speed.timing import forward_step, kv_cache_bytes, new_cache

    model, cfg = _small_llama()
    ids = torch.randint(0, 512, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        cache = new_cache(model)
        forward_step(model.eval(), ids, cache, 0)
        for i in range(5):  # five decode steps, as a decode grid point adds new tokens
            forward_step(model, ids[:, i:i + 1], cache, 20 + i)
    shape = Shape.from_config(cfg)
    assert kv_cache_bytes(cache) == estimate_kv_bytes(shape, 3 * (20 + 5), 4)
    assert estimate_kv_bytes(shape, 3 * 25, 4) == 2 * 6 * 2 * 16 * 75 * 4


def test_loss_working_set():
    assert plan_memory.loss_bytes_per_token(1000, 2) == 1000 * (2 + 4 + 4 + 4)
    assert plan_memory.loss_bytes_per_token(1000, 4) == 1000 * (4 + 4 + 4)  # float32 logits need no copy


# ----------------------------------------------------------------------------- evaluation tokens
@pytest.mark.slow
def test_eval_tokens_counted_on_the_meta_model(embedded_model):
    """The cpu preset's quick task set, cut to RTE's first 4 documents: 0-shot, two one-token
    choices sharing one forward pass per document; the tokens are those of the prompts."""
    plan = P.make_plan("cpu", notebook_overrides={"02_evaluation": {"tasks": ["rte"], "limit": 4}}, eval_tokens="yes")
    tk = plan["eval"]["tokens"]
    assert tk["status"] == "counted", tk
    row = tk["tasks"][0]
    assert (row["task"], row["docs"], row["requests"], row["forward_passes"]) == ("rte", 4, 8, 4)
    from rt_lib.assets.loading import load_dataset

    _, tok = embedded_model
    docs = load_dataset("rte", split="validation").select(range(4))
    prompts = [f"{d['sentence1']}\nQuestion: {d['sentence2']} True or False?\nAnswer:" for d in docs]
    assert row["input_tokens"] == sum(len(tok(p).input_ids) for p in prompts)
    assert plan["train"]["router_parameters"] == 16 * 576
    assert plan["model"]["parameters"] == sum(p.numel() for p in embedded_model[0].parameters())
