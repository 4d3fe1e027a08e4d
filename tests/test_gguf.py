"""GGUF files given to load_model: converted once into the kit's cache, checked, clear errors.

The real file is the embedded SmolLM2 GGUF copied to a temporary folder as a user's file (one
conversion, ~30 s, shared by the module); cache rebuilds and tokenizer defaults use a tiny llama
GGUF written here with the `gguf` package (converts in well under a second). Every conversion goes
to a temporary RT_KIT_CACHE; the embedded model itself stays in the user's cache.
"""

import json
import shutil
import time
import types

import gguf
import numpy as np
import pytest
import torch

from rt_lib.assets import loading as assets
from rt_lib.assets import cache as asset_cache
from rt_lib.assets import gguf as gguf_files
from rt_lib.files import file_sha256
from rt_lib.assets.cache import AssetError

TEXT = "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France."

Q8_0, F64 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F64
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["H e", "l l", "He ll", "Hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]


def _byte_alphabet():
    """GPT-2's printable spelling of the 256 bytes (what byte-level BPE vocabularies use)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = dict(zip(printable, printable)), 0
    for b in range(256):
        if b not in chars:
            chars[b], extra = 256 + extra, extra + 1
    return [chr(chars[b]) for b in range(256)]


def write_tiny_gguf(path, arch="llama", tensor_type=Q8_0, seed=0, add_bos=False, eos=True):
    """A 2-layer llama (d=64) with a 268-token byte-level BPE vocabulary, as llama.cpp writes it:
    no pad token, BOS <|im_start|> (prepended if ``add_bos``), EOS <|im_end|> (named if ``eos``);
    matrices in ``tensor_type``."""
    rng = np.random.default_rng(seed)
    tokens = SPECIALS + _byte_alphabet() + [m.replace(" ", "") for m in MERGES]
    d, ff, layers, heads, kv_heads = 64, 128, 2, 4, 2
    w = gguf.GGUFWriter(str(path), arch)
    for add, value in [
        (w.add_name, "tiny test model"), (w.add_context_length, 256), (w.add_embedding_length, d),
        (w.add_block_count, layers), (w.add_feed_forward_length, ff), (w.add_head_count, heads),
        (w.add_head_count_kv, kv_heads), (w.add_rope_dimension_count, d // heads),
        (w.add_layer_norm_rms_eps, 1e-5), (w.add_vocab_size, len(tokens)),
        (w.add_tokenizer_model, "gpt2"), (w.add_tokenizer_pre, "smollm"), (w.add_token_list, tokens),
        (w.add_token_types, [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))),
        (w.add_token_merges, MERGES), (w.add_bos_token_id, 1), (w.add_add_bos_token, add_bos),
    ]:
        add(value)
    if eos:
        w.add_eos_token_id(2)

    def matrix(name, rows, cols):
        a = (rng.standard_normal((rows, cols)) * 0.1).astype(np.float32)
        if tensor_type == F64:
            w.add_tensor(name, a.astype(np.float64))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, tensor_type), raw_dtype=tensor_type)

    matrix("token_embd.weight", len(tokens), d)
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(d, np.float32))
        matrix(f"blk.{i}.attn_q.weight", d, d)
        matrix(f"blk.{i}.attn_k.weight", d * kv_heads // heads, d)
        matrix(f"blk.{i}.attn_v.weight", d * kv_heads // heads, d)
        matrix(f"blk.{i}.attn_output.weight", d, d)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(d, np.float32))
        matrix(f"blk.{i}.ffn_gate.weight", ff, d)
        matrix(f"blk.{i}.ffn_up.weight", ff, d)
        matrix(f"blk.{i}.ffn_down.weight", d, ff)
    w.add_tensor("output_norm.weight", np.ones(d, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def logits(model, tok, text=TEXT):
    with torch.no_grad():
        return model(tok(text, return_tensors="pt").input_ids).logits


def entries(cache):
    """The cache folders of converted GGUF files (lock files start with a dot)."""
    return [p for p in (cache / "gguf").iterdir() if not p.name.startswith(".")]


def manifest(folder):
    return json.loads((folder / asset_cache.MANIFEST).read_text())


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RT_KIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def tiny_gguf(tmp_path):
    (tmp_path / "user").mkdir()
    return write_tiny_gguf(tmp_path / "user" / "tiny-llama.Q8_0.gguf")


@pytest.fixture(scope="module")
def smollm2_gguf(tmp_path_factory, embedded_model):
    """The embedded GGUF as a user's file, converted once into a temporary cache.

    Depends on ``embedded_model`` so that the embedded model is loaded from (or built into) the
    user's cache before RT_KIT_CACHE points elsewhere.
    """
    root = tmp_path_factory.mktemp("gguf")
    path = root / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    path.parent.mkdir()
    shutil.copyfile(assets._gguf_path(), path)  # a real copy: the package file is never touched
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RT_KIT_CACHE", str(root / "cache"))
        t0 = time.perf_counter()
        model, tok = assets.load_model(str(path))
        seconds = time.perf_counter() - t0
    print(f"first load of a GGUF file (conversion): {seconds:.1f} s")
    return types.SimpleNamespace(path=path, cache=root / "cache", model=model, tok=tok, seconds=seconds)


# ---------------------------------------------------------------------------- the real file
@pytest.mark.slow  # the module's one conversion of the 135M model, ~30 s
def test_gguf_file_loads_like_the_embedded_model(smollm2_gguf, embedded_model, monkeypatch):
    monkeypatch.setenv("RT_KIT_CACHE", str(smollm2_gguf.cache))
    model, tok = smollm2_gguf.model, smollm2_gguf.tok
    ref, ref_tok = embedded_model
    got, want = logits(model, tok), logits(ref, ref_tok)
    print(f"max |logit difference| GGUF file vs embedded model: {(got - want).abs().max().item():.2e}")
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("llama", 30, 576)
    assert getattr(cfg, "quantization_config", None) is None and model.dtype == torch.float32
    assert not model.training
    assert cfg.rt_kit_name == str(smollm2_gguf.path)
    sha = file_sha256(smollm2_gguf.path)
    assert cfg.rt_kit_source == f"{smollm2_gguf.path.resolve()} (sha256 {sha})"
    # the same tokenizer checks as the embedded model
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tok("Hello world").input_ids == ref_tok("Hello world").input_ids == [19556, 905]
    assert tok.model_max_length == 8192 and model.generation_config.pad_token_id == 2
    # the cache entry: keyed by the file's content, verified, described by its manifest
    folder = smollm2_gguf.cache / "gguf" / f"SmolLM2-135M-Instruct.Q4_1-{sha[:12]}"
    assert gguf_files.gguf_model_dir(smollm2_gguf.path) == folder
    assert asset_cache.cache_problem(folder, gguf_files.GGUF_CACHE_VERSION) is None
    info = manifest(folder)
    assert info["gguf_sha256"] == sha and info["architecture"] == "llama"
    assert info["tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(info["files"])


@pytest.mark.slow
def test_second_load_uses_the_cache(smollm2_gguf, monkeypatch):
    monkeypatch.setenv("RT_KIT_CACHE", str(smollm2_gguf.cache))
    (folder,) = entries(smollm2_gguf.cache)
    stamp = (folder / asset_cache.MANIFEST).stat().st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the GGUF was read or converted again")

    monkeypatch.setattr(gguf_files, "convert_gguf", no_rebuild)
    monkeypatch.setattr(gguf_files, "check_gguf", no_rebuild)
    t0 = time.perf_counter()
    model, tok = assets.load_model(str(smollm2_gguf.path), dtype="bfloat16", attn_implementation="eager")
    print(f"warm load of a GGUF file from the cache: {time.perf_counter() - t0:.2f} s")
    assert (folder / asset_cache.MANIFEST).stat().st_mtime_ns == stamp
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"
    top = logits(model, tok).argmax(-1), logits(smollm2_gguf.model, smollm2_gguf.tok).argmax(-1)
    assert (top[0] == top[1]).float().mean() > 0.8  # the same model, in bfloat16


# ---------------------------------------------------------------------------- a tiny file
def test_tiny_gguf_gets_pad_and_matches_transformers(tiny_gguf, cache):
    from transformers import AutoModelForCausalLM

    model, tok = assets.load_model(str(tiny_gguf))
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tok.pad_token == "<|im_end|>"  # the file names no pad token: EOS stands in
    assert model.generation_config.pad_token_id == model.config.pad_token_id == 2
    assert tok.model_max_length == 256  # the file's context length
    assert tok("Hello world").input_ids == [262, 267]  # no BOS, as the file says
    assert getattr(model.config, "quantization_config", None) is None
    direct = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32)
    assert torch.equal(logits(model, tok), logits(direct, tok))
    (folder,) = entries(cache)
    assert folder.name == f"tiny-llama.Q8_0-{file_sha256(tiny_gguf)[:12]}"
    assert manifest(folder)["tensor_types"] == {"F32": 5, "Q8_0": 15}


def test_tiny_gguf_that_asks_for_bos_gets_it(tmp_path, cache):
    model, tok = assets.load_model(str(write_tiny_gguf(tmp_path / "bos.gguf", add_bos=True)))
    assert tok("Hello world").input_ids == [1, 262, 267]
    assert tok.pad_token == "<|im_end|>" and model.config.rt_kit_name.endswith("bos.gguf")


def test_damaged_or_changed_gguf_cache_is_rebuilt(tiny_gguf, cache, caplog):
    model, tok = assets.load_model(str(tiny_gguf))
    before = logits(model, tok)
    del model  # its weights are mapped from the file about to be damaged
    folder = gguf_files.gguf_model_dir(tiny_gguf)
    weights = folder / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with caplog.at_level("WARNING", logger="rt_lib.assets.loading"):
        rebuilt, rebuilt_tok = assets.load_model(str(tiny_gguf))
    assert "not trusted" in caplog.text and "model.safetensors" in caplog.text
    assert asset_cache.cache_problem(folder, gguf_files.GGUF_CACHE_VERSION) is None
    assert torch.equal(before, logits(rebuilt, rebuilt_tok))
    (folder / asset_cache.MANIFEST).unlink()  # an interrupted build
    caplog.clear()
    with caplog.at_level("WARNING", logger="rt_lib.assets.loading"):
        assets.load_model(str(tiny_gguf))
    assert "no manifest" in caplog.text and asset_cache.cache_problem(folder) is None
    assert not list(folder.parent.glob(".*tmp-*")) and not list(folder.parent.glob(".*old-*"))
    write_tiny_gguf(tiny_gguf, seed=1)  # the user replaces the file: a new cache entry
    other, other_tok = assets.load_model(str(tiny_gguf))
    assert gguf_files.gguf_model_dir(tiny_gguf) != folder and len(entries(cache)) == 2
    assert not torch.equal(before, logits(other, other_tok))


# ---------------------------------------------------------------------------- errors
def test_missing_gguf_file_says_so(tmp_path):
    with pytest.raises(AssetError, match="no such GGUF file") as err:
        assets.load_model(str(tmp_path / "models" / "llama.Q4_0.gguf"))
    assert str(tmp_path / "models" / "llama.Q4_0.gguf") in str(err.value)
    assert "huggingface-cli download" in str(err.value)


@pytest.mark.parametrize("name, content", [("model.gguf", b"PK\x03\x04 a zip file"), ("config.json", b"{}")])
def test_file_that_is_not_gguf_says_so(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(AssetError, match=r"is not a GGUF file \(it starts with b'(PK|\{\})") as err:
        assets.load_model(str(tmp_path / name))
    assert "pass the folder that holds it" in str(err.value)


def test_truncated_gguf_is_an_asset_error(tiny_gguf, cache):
    data = tiny_gguf.read_bytes()
    tiny_gguf.write_bytes(data[:200])
    with pytest.raises(AssetError, match="cannot be read.*truncated or damaged"):
        assets.load_model(str(tiny_gguf))


def test_gguf_without_eos_says_how_to_add_it(tmp_path, cache):
    path = write_tiny_gguf(tmp_path / "no-eos.gguf", eos=False)
    with pytest.raises(AssetError, match="names no EOS token.*gguf-new-metadata --special-token eos"):
        assets.load_model(str(path))
    assert not [p for p in (cache / "gguf").iterdir() if p.is_dir()]  # nothing cached


def test_unsupported_gguf_architecture_is_named(tmp_path, cache):
    path = write_tiny_gguf(tmp_path / "rwkv.gguf", arch="rwkv6")
    with pytest.raises(AssetError, match="'rwkv6' model, an architecture that transformers") as err:
        assets.load_model(str(path))
    msg = str(err.value)
    assert "Supported GGUF architectures:" in msg and "llama" in msg and "qwen2" in msg
    assert "original Hugging Face checkpoint" in msg
    assert not list((cache / "gguf").glob("rwkv-*"))  # nothing cached


def test_unsupported_gguf_tensor_type_is_named(tmp_path, cache):
    path = write_tiny_gguf(tmp_path / "f64.gguf", tensor_type=F64)
    with pytest.raises(AssetError, match=r"stores tensors as F64 \(15 tensors\)") as err:
        assets.load_model(str(path))
    msg = str(err.value)
    assert "Supported tensor types:" in msg and "Q8_0" in msg and "Q4_K" in msg
    assert "llama-quantize" in msg
