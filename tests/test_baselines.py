"""Baselines: static attention drop (scores, choice, removal, JSON), full-parameter training,
LoRA + Router-Tuning (trained, saved and loaded together)."""

import json

import pytest
import torch

from rt_lib.tuning.baselines import (attention_importance, choose_lowest, load_full, load_lora_routers,
                              static_attention_drop, static_drop_layers, train_full, train_lora_routers)
from rt_lib.tuning.data import build_dataset
from rt_lib.mindskip.removal import drop_sublayers
from test_train import SMALL, instructions, tiny_llama

TEXT = [{"text": f"The {w} is number {i}. " * 3} for i, w in enumerate(["cat", "dog", "sun", "sea"] * 4)]


def calibration(tok, n=8):
    return build_dataset(tok, TEXT, num_samples=n, max_length=48, packing=True, seed=0)[0]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


# ----------------------------------------------------------------------------- static drop
@pytest.mark.slow
def test_importance_is_one_minus_cosine_around_attention():
    model, tok = tiny_llama()
    with torch.no_grad():  # layers 2 and 4: attention output is zero, the stream is unchanged
        for i in (2, 4):
            model.model.layers[i].self_attn.o_proj.weight.zero_()
    scores, calib = attention_importance(model, tok, examples=calibration(tok))
    assert scores[2] == pytest.approx(0.0, abs=1e-6) and scores[4] == pytest.approx(0.0, abs=1e-6)
    assert all(scores[i] > 1e-4 for i in (0, 1, 3, 5))

    # reference for one layer, computed by hand from the layer's own modules
    ex = calibration(tok)[:2]
    ids = torch.tensor([e["input_ids"] for e in ex])
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        layer = model.model.layers[3]
        pos = torch.arange(ids.shape[1])[None]
        pe = model.model.rotary_emb(hs[3], pos)
        mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)[None, None]
        attn, _ = layer.self_attn(layer.input_layernorm(hs[3]), position_embeddings=pe, attention_mask=mask)
        ref = (1 - torch.nn.functional.cosine_similarity(hs[3], hs[3] + attn, dim=-1)).mean()
    two, _ = attention_importance(model, tok, examples=ex)
    assert two[3] == pytest.approx(float(ref), rel=1e-4)


@pytest.mark.slow
def test_static_drop_removes_exactly_the_k_lowest(tmp_path):
    model, tok = tiny_llama()
    ids = torch.tensor([calibration(tok)[0]["input_ids"]])
    dense = logits(model, ids)
    drop = static_attention_drop(model, 2, tok, examples=calibration(tok), out=tmp_path)
    ranked = sorted(drop.candidates, key=lambda i: drop.scores[i])
    assert drop.layers == sorted(ranked[:2]) and 0 not in drop.candidates  # layer 0 holds the cache length
    assert all(drop.scores[i] <= drop.scores[j] for i in drop.layers for j in drop.candidates if j not in drop.layers)
    removed = [i for i, layer in enumerate(model.model.layers) if type(layer.self_attn).__name__ == "_Removed"]
    assert removed == drop.layers
    dropped = logits(model, ids)
    drop.restore()
    assert torch.equal(logits(model, ids), dense)  # restore gives the base model back
    handle = drop_sublayers(model, drop.layers)  # same as removing them by hand
    assert torch.equal(logits(model, ids), dropped)
    handle.restore()
    saved = json.loads((tmp_path / "baselines" / "static_drop.json").read_text())
    assert saved["layers"] == drop.layers and saved["k"] == 2 and set(saved["scores"]) == {str(i) for i in range(6)}
    assert static_drop_layers(model, 2, tok, examples=calibration(tok)) == drop.layers


def test_choose_lowest():
    scores = {1: 0.3, 2: 0.1, 3: 0.1, 4: 0.2}
    assert choose_lowest(scores, 2) == [2, 3]
    assert choose_lowest(scores, 2, candidates=[1, 3, 4]) == [3, 4]
    assert choose_lowest(scores, 0) == []
    with pytest.raises(ValueError):
        choose_lowest(scores, 5)
    with pytest.raises(ValueError, match="no importance score"):
        choose_lowest(scores, 1, candidates=[7])


# ----------------------------------------------------------------------------- trained baselines
def test_full_parameter_trains_backbone_and_reloads(tmp_path):
    model, tok = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = train_full(None, model=model, tokenizer=tok, data=instructions(), out=str(tmp_path / "full"),
                     **{**SMALL, "lr": 1e-3, "max_steps": 2})
    assert res.summary["trainable"] == "full"
    assert res.summary["trainable_parameters"] == sum(p.numel() for p in model.parameters())
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    res.ms.eval()
    want = logits(res.ms.model, ids)
    fresh, _ = tiny_llama()
    ms = load_full(fresh, tmp_path / "full" / "train")
    ms.eval()
    assert torch.equal(logits(ms.model, ids), want)
    changed = [k for k, v in ms.unload().state_dict().items() if not torch.equal(v, before[k])]
    assert "model.layers.0.mlp.up_proj.weight" in changed  # the backbone moved too


def test_lora_and_routers_train_save_and_load_together(tmp_path):
    model, tok = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = train_lora_routers(None, model=model, tokenizer=tok, data=instructions(), out=str(tmp_path / "lora"),
                             lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=["q_proj", "v_proj"],
                             **{**SMALL, "max_steps": 3})
    train = tmp_path / "lora" / "train"
    assert (train / "lora" / "adapter_config.json").is_file() and (train / "routers" / "routers.safetensors").is_file()
    names = [n for n, p in res.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or "mindskip_router" in n for n in names)
    assert sum("mindskip_router" in n for n in names) == 4
    lora_b = [p for n, p in res.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # adapters moved away from their zero init
    assert all(r.weight.abs().sum() > 0 for r in res.ms.routers().values())

    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    want = logits(res.model, ids)
    fresh, _ = tiny_llama()
    ms, peft_model = load_lora_routers(fresh, train)
    assert torch.equal(logits(peft_model, ids), want)
    assert {i: r.weight.tolist() for i, r in ms.routers().items()} == \
        {i: r.weight.tolist() for i, r in res.ms.routers().items()}
    # base weights under the adapters are untouched
    base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
            for k, v in res.model.state_dict().items() if "lora_" not in k and "mindskip_router" not in k}
    assert all(torch.equal(base[k], before[k]) for k in before)


def test_lora_missing_adapter_is_a_clear_error(tmp_path):
    model, _ = tiny_llama()
    with pytest.raises(FileNotFoundError, match="no LoRA adapter"):
        load_lora_routers(model, tmp_path)
