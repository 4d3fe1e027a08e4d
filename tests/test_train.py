"""Router-Tuning on a tiny random Llama: what trains, pinned losses, resume, regulariser,
errors before training, files written, recipes, notebook 01's options, CLI."""

import csv
import json
import math

import pytest
import torch
import transformers as tf

from rt_lib.mindskip.config import MindSkipConfig
from rt_lib.runs import schema
from rt_lib.tuning.data import build_dataset, byte_tokenizer, collate
from rt_lib.tuning.heldout import evaluate_heldout, heldout_lm_loss
from rt_lib.mindskip.model import get_mindskip_model
from rt_lib.tuning.tuner import RouterTuner
from rt_lib.cli.train import build_parser, main
from rt_lib.tuning.config import TRAIN_RECIPES, TrainConfig, make_config, notebook_config, notebook_options
from rt_lib.tuning.train import train_routers


def tiny_llama(seed: int = 0, layers: int = 6):
    """A tiny random LlamaForCausalLM with the byte tokenizer (259 ids), deterministic."""
    tok = byte_tokenizer()
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=0, eos_token_id=1, pad_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tf.LlamaForCausalLM(cfg).eval()
    return model, tok


def instructions(n: int = 64):
    words = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree"]
    return [{"instruction": f"Repeat the word {words[i % 8]} {i % 5 + 1} times",
             "output": " ".join([words[i % 8]] * (i % 5 + 1))} for i in range(n)]


# Options of the runs below: 6-layer model, routers on layers 1..4, 8 sequences per step.
SMALL = dict(num_samples=48, heldout_samples=8, max_length=64, num_routed_layers=4, batch_size=8,
             micro_batch_size=4, lr=1e-2, reg_lambda=0.5, max_steps=6, warmup_ratio=0.0, precision="fp32",
             seed=0, progress=False, threads=1)


def run_small(tmp_path=None, name="run", model=None, **kw):
    model, tok = model or tiny_llama()
    opts = {**SMALL, **kw}
    if tmp_path is not None:
        opts["out"] = str(tmp_path / name)
    return train_routers(None, model=model, tokenizer=tok, data=instructions(), **opts)


def router_weights(ms):
    return {i: r.weight.detach().clone() for i, r in ms.routers().items()}


# ----------------------------------------------------------------------------- what trains
def test_only_router_weights_change():
    model, tok = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = run_small(model=(model, tok))
    assert all(r.weight.abs().sum() > 0 for r in res.ms.routers().values())  # routers moved
    after = res.ms.unload().state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []  # every backbone tensor bit-identical
    assert res.summary["trainable_parameters"] == 4 * 32


def test_pinned_losses():
    """The first losses of a tiny deterministic run: any change to data, template, loss
    normalisation, regulariser or optimiser shows up here."""
    res = run_small(max_steps=3)
    got = [(r["loss"], r["lm_loss"], r["reg_loss"], r["mean_capacity"]) for r in res.log]
    expected = PINNED
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, rel=1e-5, abs=1e-6)
    assert len(got) == len(expected)


# (loss, lm_loss, reg_loss, mean_capacity) of steps 1..3. Step 1: zero-initialised routers keep
# all 4 layers, reg = 0.5 * 4 * (1 - 0.5); the first update flips every decision (r starts at the
# threshold), so step 2 skips all four: no regulariser, slightly higher LM loss.
PINNED = [
    (6.5615234375, 5.5615234375, 1.0, 1.0),
    (5.56321907043457, 5.56321907043457, 0.0, 0.0),
    (5.549758000160331, 5.549758000160331, 0.0, 0.0),
]


# ----------------------------------------------------------------------------- tuner phases
def test_tuner_phases_give_the_run_of_train_routers(tmp_path):
    """setup / step / record / finish driven by hand: each step returns the row that lands in
    train/log.csv, and the whole gives the log and routers of train_routers."""
    model, tok = tiny_llama()
    cfg = make_config(None, **{**SMALL, "max_steps": 3, "out": str(tmp_path / "manual")})
    tuner = RouterTuner(cfg)
    tuner.setup(model=model, tokenizer=tok, data=instructions())
    assert list(tuner.steps()) == [0, 1, 2] and tuner.accum == 2  # 8 = micro batch 4 x 2
    assert tuner.dense_loss is not None  # the dense reference is taken before any update
    for k in tuner.steps():
        row = tuner.step(k)
        tuner.record(row)
        with open(tmp_path / "manual/train/log.csv") as f:
            last = list(csv.DictReader(f))[-1]
        assert int(last["step"]) == k + 1 == row["step"]
        assert float(last["loss"]) == pytest.approx(row["loss"], rel=1e-12)
    result = tuner.finish()
    assert result.summary["finished"] and (tmp_path / "manual/train/routers/routers.safetensors").is_file()

    reference = run_small(max_steps=3)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]  # noqa: E731
    assert strip(result.log) == strip(reference.log)
    a, b = router_weights(result.ms), router_weights(reference.ms)
    assert all(torch.equal(a[i], b[i]) for i in a)


def test_heldout_lm_loss_matches_transformers_loss():
    """Summed over batches of 3 and divided by all label tokens = the model's own mean loss
    over one batch of everything."""
    model, tok = tiny_llama()
    examples, _ = build_dataset(tok, instructions(8), max_length=64)
    ours = heldout_lm_loss(model, examples, pad_id=tok.pad_token_id, batch_size=3)
    batch = collate(examples, tok.pad_token_id)
    with torch.no_grad():
        reference = model(**batch).loss
    assert ours == pytest.approx(float(reference), rel=1e-5)


@pytest.mark.parametrize("threshold, capacity", [(0.4, 1.0), (0.6, 0.0)])
def test_evaluate_heldout_capacity_and_margin(threshold, capacity):
    """Zero-initialised routers score sigmoid(0) = 0.5 everywhere: below a 0.4 threshold every
    sublayer runs, above 0.6 none does; either way the margin is |0.5 - threshold| = 0.1."""
    model, tok = tiny_llama()
    examples, _ = build_dataset(tok, instructions(8), max_length=64)
    plain = heldout_lm_loss(model, examples, pad_id=tok.pad_token_id, batch_size=4)
    ms = get_mindskip_model(model, MindSkipConfig(num_routed_layers=4, threshold=threshold))
    opts = dict(pad_id=tok.pad_token_id, batch_size=4, device=torch.device("cpu"))
    routed = evaluate_heldout(ms, ms.model, examples, dense=False, **opts)
    assert routed.capacity == {i: capacity for i in (1, 2, 3, 4)}
    assert all(m == pytest.approx(0.1) for m in routed.margin.values())
    dense = evaluate_heldout(ms, ms.model, examples, dense=True, **opts)
    assert dense.capacity == {i: 1.0 for i in (1, 2, 3, 4)} and dense.lm_loss == pytest.approx(plain, rel=1e-6)
    assert (routed.lm_loss == pytest.approx(plain, rel=1e-6)) == (capacity == 1.0)
    assert all(g.forced is None for g in ms.gates.values())  # routers decide again afterwards


# ----------------------------------------------------------------------------- resume
def test_resume_equals_uninterrupted(tmp_path):
    full = run_small(tmp_path, "full", save_every=2)
    part = run_small(tmp_path, "part", stop_after=3)
    assert not part.summary["finished"] and part.summary["steps"] == 3
    assert (tmp_path / "part/train/checkpoints/step-000003/trainer_state.safetensors").is_file()
    assert (tmp_path / "part/train/checkpoints/step-000003/trainer_state.json").is_file()
    assert not (tmp_path / "part/train/routers").exists()  # the end is not reached yet
    resumed = run_small(tmp_path, "part", resume_from="latest")
    a, b = router_weights(full.ms), router_weights(resumed.ms)
    assert all(torch.equal(a[i], b[i]) for i in a)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]  # noqa: E731
    assert strip(full.log) == strip(resumed.log)
    with open(tmp_path / "part/train/log.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, 7))
    assert sorted(p.name for p in (tmp_path / "full/train/checkpoints").iterdir()) == [
        "step-000002", "step-000004", "step-000006"]


def test_resume_refuses_changed_options(tmp_path):
    run_small(tmp_path, "part", stop_after=2)
    with pytest.raises(ValueError, match="options differ"):
        run_small(tmp_path, "part", resume_from="latest", lr=5e-3)


def test_resume_reads_a_checkpoint_that_calls_the_recipe_preset(tmp_path):
    """Checkpoints of runs made before the rename record the recipe as ``preset``."""
    run_small(tmp_path, "part", stop_after=2)
    state = tmp_path / "part/train/checkpoints/step-000002/trainer_state.json"
    text = state.read_text()
    assert '"recipe": null' in text
    state.write_text(text.replace('"recipe": null', '"preset": null'))
    assert run_small(tmp_path, "part", resume_from="latest", stop_after=3).summary["steps"] == 3


def test_resume_reads_a_checkpoint_written_before_an_option_existed(tmp_path):
    """An option added since the checkpoint was written takes its default (the behaviour that run had);
    a value other than the default is still refused."""
    run_small(tmp_path, "part", stop_after=2)
    state = tmp_path / "part/train/checkpoints/step-000002/trainer_state.json"
    record = json.loads(state.read_text())
    del record["config"]["target_anneal"]
    for row in record["log"]:
        del row["capacity_target"]  # nor did its log record the target
    state.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="target_anneal"):
        run_small(tmp_path, "part", resume_from="latest", stop_after=3, target_anneal=0.5)
    assert run_small(tmp_path, "part", resume_from="latest", stop_after=3).summary["steps"] == 3
    with open(tmp_path / "part/train/log.csv") as f:
        header, *rows = list(csv.reader(f))
    assert schema.header_matches("train/log.csv", header)  # the declared column order, not appended last
    targets = [r[header.index("capacity_target")] for r in rows]
    assert targets[:2] == ["", ""] and float(targets[2]) > 0


# ----------------------------------------------------------------------------- regulariser
@pytest.mark.slow
def test_regulariser_drives_capacity_toward_target():
    free = run_small(reg_lambda=0.0, max_steps=12)
    reg = run_small(reg_lambda=0.5, max_steps=12, capacity_target=0.5)
    assert free.log[0]["mean_capacity"] == reg.log[0]["mean_capacity"] == 1.0  # zero init keeps everything
    # the LM loss alone brings capacity back up after the first (arbitrary) flips ...
    assert free.log[-1]["mean_capacity"] >= 0.7
    # ... the regulariser holds every routed layer at or below the target: the hinge is inactive
    last = reg.log[-1]
    assert all(last[f"capacity_L{i}"] <= 0.5 for i in (1, 2, 3, 4)) and last["reg_loss"] == 0.0
    assert all(c <= 0.5 for c in reg.summary["final_capacity"].values())  # held-out, eval mode
    assert reg.log[-1]["mean_capacity"] < free.log[-1]["mean_capacity"]


def test_annealed_target_falls_from_one_and_the_saved_config_keeps_the_final_one():
    res = run_small(max_steps=8, capacity_target=0.5, target_anneal=0.5)
    targets = [r["capacity_target"] for r in res.log]
    assert targets == pytest.approx([0.875, 0.75, 0.625, 0.5, 0.5, 0.5, 0.5, 0.5])  # 1 - 0.5 * (t + 1) / 4
    assert res.ms.config.capacity_target == 0.5
    # with the target above a layer's capacity the hinge is off: no regulariser at a target of 1
    plain = run_small(max_steps=8, capacity_target=0.5)
    assert [r["capacity_target"] for r in plain.log] == [0.5] * 8
    assert res.log[0]["reg_loss"] < plain.log[0]["reg_loss"]


# ----------------------------------------------------------------------------- files
def test_run_folder_files(tmp_path):
    res = run_small(tmp_path, "r", max_steps=2)
    train = tmp_path / "r" / "train"
    with open(train / "log.csv") as f:
        rows = list(csv.DictReader(f))
    cols = ["step", "loss", "lm_loss", "reg_loss", "lr", "capacity_target", "mean_capacity",
            *[f"capacity_L{i}" for i in (1, 2, 3, 4)], "tokens", "elapsed_s"]
    assert list(rows[0]) == cols and len(rows) == 2
    assert json.loads((train / "log.json").read_text())[1]["step"] == 2
    s = json.loads((train / "summary.json").read_text())
    for key in ("wall_time_s", "peak_memory_mb", "steps", "final_capacity", "heldout_lm_loss", "recipe", "config"):
        assert key in s
    assert set(s["final_capacity"]) == set(s["heldout_router_margin"]) == {"1", "2", "3", "4"}
    assert all(0 < m < 0.5 for m in s["heldout_router_margin"].values())  # routers left the threshold
    assert s["heldout_lm_loss"]["dense"] > 0 and s["heldout_lm_loss"]["tuned"] > 0
    assert s["data"]["sequences"] == 48 and s["data"]["dropped_all_masked"] == 0
    assert sorted(p.name for p in (train / "routers").iterdir()) == ["mindskip_config.json", "routers.safetensors"]
    assert not list(train.glob(".*"))  # no temporary folders left behind
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert run["steps"]["train"]["steps"] == 2 and run["parameters"]["train"]["lr"] == 1e-2

    from rt_lib.mindskip.model import MindSkipModel

    model, _ = tiny_llama()
    loaded = MindSkipModel.from_pretrained(model, train / "routers", strict_base=False)
    a, b = router_weights(res.ms), router_weights(loaded)
    assert all(torch.equal(a[i], b[i]) for i in a)


def test_schedule_warmup_and_cosine():
    res = run_small(max_steps=10, warmup_ratio=0.2)
    lrs = [r["lr"] for r in res.log]
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(5e-3) and lrs[2] == pytest.approx(1e-2)
    assert lrs[3:] == sorted(lrs[3:], reverse=True)
    assert lrs[6] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))


# ----------------------------------------------------------------------------- bad input
def no_training(tmp_path, name="bad"):
    return not (tmp_path / name / "train" / "log.csv").exists()


@pytest.mark.parametrize("opts, err, match", [
    (dict(routed_layers=[]), ValueError, "routed_layers is empty"),
    (dict(num_routed_layers=0), ValueError, "num_routed_layers"),
    (dict(num_routed_layers=9), ValueError, "too many"),
    (dict(max_length=20), ValueError, "not longer than the 'paper' template"),
    (dict(batch_size=10), ValueError, "not a multiple"),
    (dict(num_samples=4), ValueError, "fewer than one global batch"),
    (dict(trainable="adapters"), ValueError, "trainable must be"),
    (dict(target_anneal=1.5), ValueError, "target_anneal must be"),
])
def test_bad_options_fail_before_training(tmp_path, opts, err, match):
    with pytest.raises(err, match=match):
        run_small(tmp_path, "bad", **opts)
    assert no_training(tmp_path)


def test_bad_data_fails_before_training(tmp_path):
    model, tok = tiny_llama()
    with pytest.raises(ValueError, match="cannot tell the data format"):
        train_routers(None, model=model, tokenizer=tok, data=[{"question": "q", "answer": "a"}] * 20,
                      **{**SMALL, "out": str(tmp_path / "bad")})
    with pytest.raises(ValueError, match="no usable example"):
        train_routers(None, model=model, tokenizer=tok, data=[{"instruction": "x" * 80, "output": "y"}] * 20,
                      **{**SMALL, "out": str(tmp_path / "bad")})
    assert no_training(tmp_path)


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match="not writable"):
        run_small(out=str(blocker / "run"))


def test_unknown_option_and_recipe():
    with pytest.raises(TypeError, match="unknown training options"):
        make_config("smoke", learning_rate=1.0)
    with pytest.raises(ValueError, match=r"unknown recipe 'huge'; recipes: \['cpu', 'paper', 'smoke'\]"):
        make_config("huge")


# ----------------------------------------------------------------------------- recipes and CLI
@pytest.mark.parametrize("name", ["smoke", "cpu", "paper"])
def test_recipes_load(name):
    assert name in TRAIN_RECIPES
    cfg = make_config(name)
    assert cfg.recipe == name and cfg.batch_size % cfg.micro_batch_size == 0
    assert cfg.reg_lambda > 0  # every recipe uses the capacity regulariser


def test_notebook_options_are_the_named_parameters_then_train_options():
    """Notebook 01 (and the plan of a pipeline preset) build the training options with one
    function: named parameters that are set, then ``train_options``; a wrong field is refused."""
    params = {"recipe": "smoke", "lr": 0.5, "max_steps": None, "train_options": {"lr": 0.25, "num_samples": 8},
              "run_dir": "ignored", "sample_prompt": "ignored"}
    assert notebook_options(params) == {"lr": 0.25, "num_samples": 8}
    cfg = notebook_config(params, max_steps=2, threads=None)
    assert (cfg.recipe, cfg.lr, cfg.num_samples, cfg.max_steps) == ("smoke", 0.25, 8, 2)
    assert notebook_config({}).recipe == "cpu"
    with pytest.raises(ValueError, match=r"train_options has unknown fields \['learning_rate'\]; valid: "):
        notebook_options({"train_options": {"learning_rate": 1.0}})
    with pytest.raises(ValueError, match="the recipe is the notebook's recipe parameter"):
        notebook_options({"train_options": {"recipe": "paper"}})
    with pytest.raises(ValueError, match="unknown recipe 'huge'"):
        notebook_config({"recipe": "huge"})


def test_cli_maps_to_config():
    args = vars(build_parser().parse_args(
        ["--recipe", "smoke", "--lr", "0.5", "--routed-layers", "1", "2", "--no-progress", "--adam-betas", "0.8", "0.9"]))
    recipe = args.pop("recipe")
    cfg = make_config(recipe, **args)
    assert (cfg.lr, cfg.routed_layers, cfg.progress, cfg.adam_betas) == (0.5, [1, 2], False, [0.8, 0.9])
    assert cfg.max_length == make_config("smoke").max_length  # untouched options keep the recipe's value
    assert set(TrainConfig.help()) == {a.dest for a in build_parser()._actions} - {"help"}


def test_cli_old_preset_flag_is_a_hidden_alias_of_recipe(capsys):
    args = vars(build_parser().parse_args(["--preset", "smoke", "--lr", "0.5"]))
    assert args["recipe"] == "smoke" and args["lr"] == 0.5
    assert capsys.readouterr().err.strip() == "note: --preset is deprecated, use --recipe"
    assert build_parser().parse_args(["--recipe", "paper"]).recipe == "paper"
    assert capsys.readouterr().err == ""
    usage = build_parser().format_help()
    assert "--recipe" in usage and "--preset" not in usage


def test_cli_flags_override_only_what_is_given():
    """Every flag defaults to None (the recipe's value); --no-<flag> turns off a boolean a recipe
    turned on, and the underscore spelling of a flag is accepted too."""
    args = vars(build_parser().parse_args([]))
    assert args.pop("recipe") == "cpu" and set(args.values()) == {None}
    assert make_config("cpu").packing is True
    args = vars(build_parser().parse_args(["--recipe", "cpu", "--no-packing", "--max_steps", "3"]))
    cfg = make_config(args.pop("recipe"), **args)
    assert (cfg.packing, cfg.max_steps, cfg.lr) == (False, 3, make_config("cpu").lr)
    args = vars(build_parser().parse_args(["--packing", "--progress"]))
    assert (args["packing"], args["progress"]) == (True, True)


def test_cli_end_to_end(tmp_path):
    model, tok = tiny_llama()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in instructions()))
    res = main(["--recipe", "smoke", "--model", str(tmp_path / "model"), "--data", str(data), "--data-split", "train",
                "--heldout-split", "train", "--num-samples", "16", "--max-length", "64", "--packing",
                "--num-routed-layers", "2", "--max-steps", "2", "--no-progress", "--out", str(tmp_path / "cli")])
    assert (tmp_path / "cli/train/summary.json").is_file()
    assert res.summary["data"]["packing"] and res.summary["steps"] == 2
