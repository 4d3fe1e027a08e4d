"""Tuning data: template, label masking, selection, truncation, packing, errors."""

import json

import pytest
import torch

from rt_lib.tuning.data import (IGNORE_INDEX, build_dataset, byte_tokenizer, collate, load_records,
                         select_indices, template_overhead)

ALPACA = [
    {"instruction": "Say hi", "input": "", "output": "Hi!"},
    {"instruction": "Add", "input": "2 and 3", "output": "5"},
    {"instruction": "Name a colour", "output": "Blue"},
]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def trained_text(tok, ex):
    ids = [i for i, l in zip(ex["input_ids"], ex["labels"]) if l != IGNORE_INDEX]
    return tok.decode(ids)


def test_paper_template_and_response_only_loss(tok):
    ex, stats = build_dataset(tok, ALPACA[:1], max_length=128)
    assert tok.decode(ex[0]["input_ids"]) == "<s><|user|>\nSay hi\n<|assistant|>\nHi!</s>"
    assert trained_text(tok, ex[0]) == "Hi!</s>"  # response + EOS, nothing else
    assert ex[0]["labels"][: -4] == [IGNORE_INDEX] * (len(ex[0]["labels"]) - 4)
    assert stats.format == "instruction" and stats.template == "paper"
    assert stats.label_tokens == 4 and stats.sequences == 1 and stats.dropped_all_masked == 0


def test_alpaca_input_and_system_prompt(tok):
    ex, _ = build_dataset(tok, ALPACA[1:2], max_length=128, system_prompt="Be brief.")
    assert tok.decode(ex[0]["input_ids"]) == (
        "<s><|system|>\nBe brief.\n<|user|>\nAdd\n\n2 and 3\n<|assistant|>\n5</s>")


def test_multi_turn_messages_train_every_assistant_turn(tok):
    conv = [{"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "B"},
        {"role": "user", "content": "c"}, {"role": "assistant", "content": "D"}]}]
    ex, _ = build_dataset(tok, conv, max_length=128)
    assert tok.decode(ex[0]["input_ids"]) == (
        "<s><|user|>\na\n<|assistant|>\nB</s>\n<|user|>\nc\n<|assistant|>\nD</s>")
    assert trained_text(tok, ex[0]) == "B</s>D</s>"


def test_sharegpt_conversations(tok):
    conv = [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "A"}]}]
    ex, _ = build_dataset(tok, conv, max_length=64)
    assert trained_text(tok, ex[0]) == "A</s>"


def test_chat_template_masks_all_but_assistant(tok):
    tok = byte_tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    ex, stats = build_dataset(tok, ALPACA[:1], template="chat", max_length=128)
    assert tok.decode(ex[0]["input_ids"]) == "<user>Say hi</s><assistant>Hi!</s>"
    assert trained_text(tok, ex[0]) == "Hi!</s>"
    assert stats.template == "chat"


def test_chat_template_missing_is_an_error(tok):
    with pytest.raises(ValueError, match="no chat template"):
        build_dataset(tok, ALPACA, template="chat", max_length=128)


def test_truncated_away_responses_are_dropped_and_counted(tok):
    data = [{"instruction": "x" * 60, "output": "long answer"}] + ALPACA
    ex, stats = build_dataset(tok, data, max_length=40)
    assert stats.selected == 4 and stats.dropped_all_masked == 1 and stats.sequences == 3
    assert stats.truncated >= 1
    assert all(len(e["input_ids"]) <= 40 for e in ex)


def test_max_length_shorter_than_template(tok):
    n = template_overhead(tok, "paper")
    with pytest.raises(ValueError, match="not longer than the 'paper' template"):
        build_dataset(tok, ALPACA, max_length=n)
    # the empty exchange (with EOS) + "Say hi" (6 bytes) + "Hi!" (3 bytes) - EOS: EOS is cut off
    ex, stats = build_dataset(tok, ALPACA[:1], max_length=n + 6 + 3 - 1)
    assert trained_text(tok, ex[0]) == "Hi!" and stats.truncated == 1


def test_zero_usable_examples(tok):
    with pytest.raises(ValueError, match="no usable example"):
        build_dataset(tok, [{"instruction": "x" * 80, "output": "y"}], max_length=50)


@pytest.mark.parametrize("rows, match", [
    ([{"question": "q", "answer": "a"}], "cannot tell the data format"),
    ([], "empty"),
])
def test_missing_fields(tok, rows, match):
    with pytest.raises(ValueError, match=match):
        build_dataset(tok, rows, max_length=64)


def test_forced_format_checks_fields(tok):
    with pytest.raises(ValueError, match="needs a 'text' field"):
        build_dataset(tok, ALPACA, format="text", max_length=64)
    with pytest.raises(ValueError, match="instruction data needs"):
        build_dataset(tok, [{"text": "abc"}], format="instruction", max_length=64)


def test_seeded_selection_is_deterministic_and_disjoint():
    a = select_indices(100, 10, seed=42)
    assert a == select_indices(100, 10, seed=42)
    assert a != select_indices(100, 10, seed=43)
    held = select_indices(100, 10, seed=42, skip=10)
    assert not set(a) & set(held)
    assert a + held == select_indices(100, 20, seed=42)


def test_num_samples_selects_a_seeded_subset(tok):
    data = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(20)]
    ex1, s1 = build_dataset(tok, data, num_samples=5, seed=1, max_length=64)
    ex2, _ = build_dataset(tok, data, num_samples=5, seed=1, max_length=64)
    ex3, _ = build_dataset(tok, data, num_samples=5, seed=2, max_length=64)
    assert ex1 == ex2 and ex1 != ex3
    assert s1.selected == 5 and s1.available == 20


def test_text_labels_are_all_tokens_and_packing(tok):
    docs = [{"text": "abcdefghij" * 3}, {"text": "klmnop" * 4}, {"text": "qrs"}]
    ex, stats = build_dataset(tok, docs, max_length=16, packing=False, seed=0)
    assert stats.format == "text" and stats.template is None
    assert all(e["labels"] == e["input_ids"] for e in ex)
    assert stats.truncated == 2 and max(len(e["input_ids"]) for e in ex) == 16

    packed, pstats = build_dataset(tok, docs, max_length=16, packing=True, seed=0)
    total = sum(len(d["text"]) + 2 for d in docs)  # BOS + bytes + EOS per document
    assert [len(e["input_ids"]) for e in packed] == [16] * (total // 16) + [total % 16]
    assert pstats.tokens == total and pstats.truncated == 0
    two, _ = build_dataset(tok, docs, max_length=16, packing=True, seed=0, num_samples=2)
    assert two == packed[:2]  # with packing num_samples counts packed sequences
    rest, _ = build_dataset(tok, docs, max_length=16, packing=True, seed=0, num_samples=2, skip=2)
    assert rest == packed[2:4]


def test_local_json_and_jsonl(tok, tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in ALPACA) + "\n")
    q = tmp_path / "d.json"
    q.write_text(json.dumps({"data": ALPACA}))
    assert load_records(str(p)) == ALPACA == load_records(q)
    ex, _ = build_dataset(tok, str(p), max_length=64)
    assert len(ex) == 3
    with pytest.raises(FileNotFoundError):
        load_records(str(tmp_path / "missing.jsonl"))


def test_collate_pads_and_masks(tok):
    ex, _ = build_dataset(tok, ALPACA, max_length=64, seed=0)
    b = collate(ex, pad_token_id=tok.pad_token_id)
    lengths = [len(e["input_ids"]) for e in ex]
    assert b["input_ids"].shape == (3, max(lengths)) == b["labels"].shape == b["attention_mask"].shape
    assert b["attention_mask"].sum(1).tolist() == lengths
    pad = b["attention_mask"] == 0
    assert (b["labels"][pad] == IGNORE_INDEX).all() and (b["input_ids"][pad] == tok.pad_token_id).all()
    for i, e in enumerate(ex):
        assert b["input_ids"][i, : lengths[i]].tolist() == e["input_ids"]
        assert torch.equal(b["labels"][i, : lengths[i]], torch.tensor(e["labels"]))
