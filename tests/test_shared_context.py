"""Log-likelihoods with each context computed once and routing decided from the context
(rt_lib.evaluation.shared_context): equal to one forward per request for dense models and
token routing, equal to the context's own decisions for sequence routing, batch invariant."""

import pytest
import torch
from lm_eval.models.huggingface import HFLM

from rt_lib.assets import loading as assets
from rt_lib.evaluation.harness import MindSkipLM
from rt_lib.evaluation.shared_context import plan_groups, score_shared_context
from rt_lib.mindskip.config import MindSkipConfig
from rt_lib.mindskip.model import get_mindskip_model
from tests.test_evaluation import loglikelihoods, routed, run, tiny_llama


@pytest.fixture(scope="module")
def tok():
    return assets.load_model("tiny-random-llama")[1]


def requests(seed=0, n_ctx=5, per_ctx=(1, 4), vocab=200):
    """Contexts of different lengths, each with several continuations of different lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in range(n_ctx):
        ctx = torch.randint(3, vocab, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
        for _ in range(int(torch.randint(per_ctx[0], per_ctx[1] + 1, (1,), generator=g))):
            out.append((ctx, torch.randint(3, vocab, (int(torch.randint(1, 6, (1,), generator=g)),),
                                           generator=g).tolist()))
    return out


def one_forward(model, ctx, cont):
    """log p(cont | ctx) and greedy from one forward over ctx + cont[:-1] (no cache, no padding)."""
    ids = torch.tensor([ctx + cont[:-1]])
    with torch.no_grad():
        lp = model(input_ids=ids).logits[0, len(ctx) - 1:].float().log_softmax(-1)
    target = torch.tensor(cont)
    return float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())


def test_groups_share_contexts_and_leave_out_what_needs_truncation():
    reqs = [([1, 2], [3]), ([1, 2], [4, 5]), ([7], [8]), ([1] * 10, [2] * 4)]
    groups, rest = plan_groups(reqs, max_length=8)
    assert groups == {(1, 2): [0, 1], (7,): [2]} and rest == [3]
    assert list(groups) == [(1, 2), (7,)]  # largest total continuation length first


@pytest.mark.parametrize("pack", [True, False])
def test_dense_scores_equal_one_forward_per_request(tok, pack):
    """Packed (continuations in their context's row, a custom mask) or repeated (a row each)."""
    model = tiny_llama(tok)
    reqs = requests()
    for bs in (1, 3):
        got, rest = score_shared_context(model, reqs, batch_size=bs, max_length=64, pad_id=0, pack=pack)
        assert rest == []
        for (ctx, cont), (lp, greedy) in zip(reqs, got):
            ref = one_forward(model, ctx, cont)
            assert lp == pytest.approx(ref[0], abs=1e-4) and greedy == ref[1]


def test_packing_is_refused_for_token_routing(tok):
    model = tiny_llama(tok)
    ms = get_mindskip_model(model, MindSkipConfig(routed_layers=[1], route_level="token"))
    try:
        with pytest.raises(ValueError, match="cannot share"):
            score_shared_context(model, requests(), batch_size=2, max_length=64, pad_id=0, gates=ms.gates, pack=True)
    finally:
        ms.unload()


@pytest.mark.parametrize("pack", [True, False])
def test_sequence_routers_decide_from_the_context_alone(tok, pack):
    """Each request scores as if the routers' decisions on its context alone were forced for the
    whole forward: the continuation never changes which layers run."""
    model = tiny_llama(tok)
    ms = routed(model, layers=(1, 2), scale=40.0)
    reqs = requests(seed=1, n_ctx=8)
    try:
        got, _ = score_shared_context(model, reqs, batch_size=4, max_length=64, pad_id=0, gates=ms.gates, pack=pack)
        decisions = set()
        for (ctx, cont), (lp, greedy) in zip(reqs, got):
            with torch.no_grad():
                ms(input_ids=torch.tensor([ctx]))
            keep = {i: bool(g.last_keep[0]) for i, g in ms.gates.items()}
            decisions.add(tuple(keep.values()))
            ms.force(keep)
            try:
                ref = one_forward(model, ctx, cont)
            finally:
                ms.force(None)
            assert lp == pytest.approx(ref[0], abs=1e-4) and greedy == ref[1]
        assert len(decisions) > 1  # the routers really split the contexts
    finally:
        ms.unload()


def test_token_routers_give_the_scores_of_one_forward(tok):
    model = tiny_llama(tok)
    ms = get_mindskip_model(model, MindSkipConfig(routed_layers=[1, 2], route_level="token"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for r in ms.routers().values():
            r.weight.copy_(torch.randn(r.weight.shape, generator=g) * 40.0 / r.weight.shape[1] ** 0.5)
    reqs = requests(seed=2)
    try:
        got, _ = score_shared_context(model, reqs, batch_size=3, max_length=64, pad_id=0, gates=ms.gates)
        for (ctx, cont), (lp, greedy) in zip(reqs, got):
            ref = one_forward(model, ctx, cont)
            assert lp == pytest.approx(ref[0], abs=1e-4) and greedy == ref[1]
        assert any(0 < g.n_exec < g.n_total for g in ms.gates.values())
    finally:
        ms.unload()


@pytest.mark.slow
def test_harness_routing_input_options(tok):
    from rt_lib.evaluation.harness import task_manager

    tm = task_manager(offline=True)
    model = tiny_llama(tok, seed=1)
    tasks = ["hellaswag_offline"]  # four endings per context
    plain = run(HFLM(pretrained=model, tokenizer=tok, batch_size=3), tm, tasks, limit=3, num_fewshot=1)
    shared = run(MindSkipLM(pretrained=model, tokenizer=tok, batch_size=3), tm, tasks, limit=3, num_fewshot=1)
    whole = run(MindSkipLM(pretrained=model, tokenizer=tok, batch_size=3, routing_input="context+continuation"),
                tm, tasks, limit=3, num_fewshot=1)
    for task in tasks:
        a, b, c = (loglikelihoods(r, task) for r in (plain, shared, whole))
        assert c == a  # HFLM's computation: bit-identical
        assert all(x == pytest.approx(y, abs=1e-4) for k in a for x, y in zip(a[k], b[k]))
    with pytest.raises(ValueError, match="routing_input"):
        MindSkipLM(pretrained=model, tokenizer=tok, routing_input="continuation")


@pytest.mark.slow
def test_embedded_model_dense_scores_equal_plain_hflm_per_task_family(embedded_model):
    """SmolLM2-135M-Instruct in float32: one task per request shape (several endings of one
    context; two solutions; a context per choice with one shared continuation; yes/no)."""
    from rt_lib.evaluation.harness import task_manager

    model, tok = embedded_model
    tm = task_manager(offline=True)
    tasks = ["hellaswag_offline", "piqa_offline", "winogrande_offline", "boolq_offline"]
    a = run(MindSkipLM(pretrained=model, tokenizer=tok, batch_size=4), tm, tasks, limit=2, num_fewshot=0)
    b = run(HFLM(pretrained=model, tokenizer=tok, batch_size=4), tm, tasks, limit=2, num_fewshot=0)
    for task in tasks:
        la, lb = loglikelihoods(a, task), loglikelihoods(b, task)
        assert la.keys() == lb.keys()
        for k in la:
            assert la[k] == pytest.approx(lb[k], abs=2e-3), task
