"""Tiny random-weight decoders of each supported architecture, built in the test (no downloads)."""

import torch
import transformers as tf

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

ARCHS = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {"head_dim": 8}),
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, {"head_dim": 8, "sliding_window": 8}),
    "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, {"head_dim": 8, "sliding_window": 8}),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {}),
}


EAGER_ONLY = {"gemma2"}  # transformers refuses sdpa for Gemma2 (softcapping)


def tiny_model(arch: str = "llama", attn_implementation: str = "sdpa", seed: int = 0, **overrides):
    cfg_cls, model_cls, extra = ARCHS[arch]
    if arch in EAGER_ONLY:
        attn_implementation = "eager"
    cfg = cfg_cls(**{**COMMON, **extra, **overrides})
    cfg._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    return model


def random_routers(ms, seed: int = 0, scale: float = 4.0):
    """Give routers random weights so that decisions differ between sequences/tokens."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in ms.routers().values():
            r.weight.copy_(torch.randn(r.weight.shape, generator=g) * scale / r.weight.shape[1] ** 0.5)


def padded_batch(lengths, vocab=96, side="left", seed=0):
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.zeros(len(lengths), t, dtype=torch.long)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for b, n in enumerate(lengths):
        seq = torch.randint(3, vocab, (n,), generator=g)
        if side == "left":
            ids[b, t - n:], mask[b, t - n:] = seq, 1
        else:
            ids[b, :n], mask[b, :n] = seq, 1
    return ids, mask


# Mixture-of-experts families: hidden 32, 4 layers, 4 experts, top-2 (Qwen2-MoE with its shared expert)
MOE_COMMON = dict(COMMON, num_hidden_layers=4)
MOE_ARCHS = {
    "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM,
                {"intermediate_size": 32, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None}),
    "qwen2_moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM,
                  {"moe_intermediate_size": 32, "shared_expert_intermediate_size": 48, "num_experts": 4,
                   "num_experts_per_tok": 2}),
    "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM,
                  {"moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2, "head_dim": 8}),
    "olmoe": (tf.OlmoeConfig, tf.OlmoeForCausalLM, {"intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2}),
}


def tiny_moe(arch: str = "mixtral", attn_implementation: str = "sdpa", seed: int = 0, **overrides):
    cfg_cls, model_cls, extra = MOE_ARCHS[arch]
    cfg = cfg_cls(**{**MOE_COMMON, **extra, **overrides})
    cfg._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return model_cls(cfg).eval()


def logits(model, ids, mask=None, **kw):
    """The model's logits, without gradients."""
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).logits


def greedy_uncached(model, ids, mask, steps):
    """Greedy continuation by recomputing the whole (left-padded) sequence at every step, no cache:
    the reference that cached generation must equal. Returns (ids, per-step last logits)."""
    ids, mask = ids.clone(), mask.clone()
    outs = []
    for _ in range(steps):
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        lg = logits(model, ids, mask, position_ids=pos, use_cache=False)[:, -1]
        outs.append(lg)
        nxt = lg.argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids, torch.stack(outs, 1)


def prefill_and_decode_logits(variant, ids, steps):
    """Logits of a profiler variant (``rt_lib.speed.variants``): a prefill of ``ids`` into a new cache,
    then one token per step of ``steps`` (B, n), concatenated along the sequence."""
    from rt_lib.speed import timing

    out = []
    with variant.active() as model, torch.inference_mode():
        cache = timing.new_cache(model)
        out.append(timing.forward_step(model, ids, cache, 0, logits_to_keep=0).logits)
        for i in range(steps.shape[1]):
            out.append(timing.forward_step(model, steps[:, i:i + 1], cache, ids.shape[1] + i).logits)
    return torch.cat(out, 1)


def assert_batch_invariant(model, ms, ids, mask, level):
    """Each row of a padded batch gets the logits and routing decisions it gets alone."""
    batch_out = logits(model, ids, mask)
    batch_dec = ms.decisions()
    for b in range(ids.shape[0]):
        real = mask[b].bool()
        alone = logits(model, ids[b:b + 1, real], mask[b:b + 1, real])
        torch.testing.assert_close(batch_out[b, real], alone[0], atol=1e-5, rtol=0)
        for i, dec in ms.decisions().items():
            if level == "seq":
                assert bool(dec[0]) == bool(batch_dec[i][b])
            else:
                assert torch.equal(dec[0], batch_dec[i][b, real])


def decode_then_rewound_decode(ms, variants, prompt, steps):
    """Profiler rewind check: ``variants["mindskip"]`` prefills ``prompt`` and decodes ``steps`` one
    token at a time; ``variants["mindskip_forced"]`` then prefills a cache of its own (replacing the
    gates' stored decisions); the first cache is rewound to the prompt, the saved state put back and
    the steps decoded again. Returns (first logits, again logits, skip ratio of the first decode)."""
    from rt_lib.speed import timing

    n = prompt.shape[1]

    def decode(v, cache):
        return [timing.forward_step(v.model, steps[:, i:i + 1], cache, n + i).logits for i in range(steps.shape[1])]
    with torch.inference_mode():
        with variants["mindskip"].active():
            cache = timing.new_cache(ms.model)
            timing.forward_step(ms.model, prompt, cache, 0)
            state = variants["mindskip"].save_state()
            ms.reset_stats()
            first = decode(variants["mindskip"], cache)
            ratio = ms.skip_ratio()
        with variants["mindskip_forced"].active():
            timing.forward_step(ms.model, prompt, timing.new_cache(ms.model), 0)
        with variants["mindskip"].active():
            timing.rewind(cache, n)
            variants["mindskip"].restore_state(state)
            again = decode(variants["mindskip"], cache)
    return first, again, ratio
