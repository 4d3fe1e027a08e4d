"""The plan (``rt_lib.pipeline.plan.make_plan``) as text: one block per step, then the missing assets."""

from __future__ import annotations


def fmt_bytes(n: float | None) -> str:
    """``16.06 GB (14.96 GiB)``; small sizes in KiB/MiB."""
    if n is None:
        return "unknown"
    if n < 2**20:
        return f"{n / 2**10:.1f} KiB"
    if n < 10**9:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 1e9:.2f} GB ({n / 2**30:.2f} GiB)"


def gib(n: float | None) -> str:
    return "?" if n is None else f"{n / 2**30:.2f}"


def format_plan(plan: dict) -> str:
    """The plan as text: header, model, one block per step, missing assets."""
    gpu = plan["gpu_memory"]
    out = [f"Plan for preset {plan['preset']!r} (recipe {plan['recipe']!r}) on {plan['device']} (no weights loaded)",
           f"GPU memory: {fmt_bytes(gpu['bytes']) if gpu['bytes'] else 'unknown'}  [{gpu['source']}]"]
    for block in (_model_block, _train_block, _eval_block, _profile_block, _missing_block):
        out.append("")
        block(plan, out.append)
    return "\n".join(out)


def _model_block(plan: dict, w) -> None:
    m = plan["model"]
    w(f"Model {m['name']}  [{m['kind']}; {m['source'] or 'not found'}]")
    sh = m.get("shape")
    if sh:
        w(f"  config       {sh['architecture']}: {sh['layers']} layers, hidden {sh['hidden']}, {sh['heads']} heads "
          f"({sh['kv_heads']} KV heads x {sh['head_dim']}), MLP {sh['intermediate']}, vocab {sh['vocab']:,}, "
          f"{sh['max_positions']} positions, tied embeddings {sh['tie_word_embeddings']}")
    else:
        w("  config       missing: parameter count, memory and KV sizes are unknown (see Missing assets)")
    if m.get("parameters"):
        w(f"  parameters   {m['parameters']:,} ({m['parameters'] / 1e9:.2f} B), counted on the meta device")
    moe = m.get("moe")
    if moe:
        w(f"  MoE          {moe['moe_layers']} sparse layers x {moe['experts']} experts, top-{moe['top_k']}: "
          f"{moe['active_parameters']:,} ({moe['active_parameters'] / 1e9:.2f} B) active per token (embeddings, "
          f"attention, expert routers{', shared experts' if moe['shared_expert_parameters'] else ''} and "
          f"{moe['top_k']} experts per layer); experts {moe['expert_parameters']:,}, expert routers "
          f"{moe['expert_router_parameters']:,} parameters")
    if m.get("weights_bytes"):
        w(f"  weights      {fmt_bytes(m['weights_bytes'])} in {m['dtype']}")
    w(f"  tokenizer    {'%s tokens' % format(m['tokenizer_tokens'], ',') if m.get('tokenizer_tokens') else 'missing'}")
    wt = m["weights"]
    if wt.get("status") != "unknown":
        files = f" ({wt['files']} files, {fmt_bytes(wt['bytes'])})" if wt.get("files") else ""
        w(f"  weight files {wt['status']}" + files
          + ("" if wt["status"] == "present" else " (the run needs them, the plan does not)"))
    for note in m["notes"]:
        w(f"  note         {note}")


def _train_block(plan: dict, w) -> None:
    t, sh, gpu = plan["train"], plan["model"].get("shape"), plan["gpu_memory"]
    w(f"Step train  [{t['recipe_file']}; trainable={t['trainable']}, backbone {t['model_dtype']}, "
      f"precision {t['precision']}]")
    for key, label in (("data", "data"), ("heldout_data", "held-out")):
        if key in t:
            d = t[key]
            src = f" [{d.get('source')}]" if d.get("source") else ""
            w(f"  {label:<12} {d['name']} ({d.get('split')}): {d['status']}{src}")
    bt = t["batches"]
    acc = bt["accumulation"]
    w(f"  batches      {bt['num_samples']} samples -> {bt['steps']} optimiser steps of {bt['batch_size']} sequences; "
      f"micro batch {bt['micro_batch_size']} x {bt['max_length']} tokens, "
      + (f"{acc} accumulation steps on {bt['processes']} process(es)" if acc else bt.get("error", "")))
    if "router_parameters" in t:
        rl = t["routed_layers"]
        rb = t["router_bytes"]
        w(f"  routers      {len(rl)} layers ({rl[0]}..{rl[-1]}) x {t['router_parameters'] // len(rl)} = "
          f"{t['router_parameters']:,} parameters (float32): weights {fmt_bytes(rb['weights'])}, gradients "
          f"{fmt_bytes(rb['gradients'])}, AdamW state {fmt_bytes(rb['adamw_state'])}")
        if t["trainable"] != "routers":
            tb = t["trainable_bytes"]
            w(f"  trainable    {t['trainable_parameters']:,} parameters: gradients {fmt_bytes(tb['gradients'])}, "
              f"AdamW state {fmt_bytes(tb['adamw_state'])}")
        a = t["activations"]
        w(f"  activations  {fmt_bytes(a['bytes'])} for {bt['micro_batch_size']} x {bt['max_length']} tokens "
          f"({a['bytes_per_token']:,} bytes per token over the {a['layers_keeping']} layers that keep tensors for the "
          f"backward pass; rt_lib.pipeline.plan_memory.activation_bytes_per_token)")
        w(f"  logits       {fmt_bytes(t['logits_bytes'])} ({bt['micro_batch_size']} x {bt['max_length']} x "
          f"{sh['vocab']:,} x 4 bytes, float32); loss working set up to {fmt_bytes(t['loss_working_set_bytes'])}")
        verdict = "" if t["fits"] is None else ("  -> fits" if t["fits"] else "  -> does NOT fit")
        w(f"  total        about {fmt_bytes(t['total_bytes'])} per process{verdict}"
          + (f" {gib(gpu['bytes'])} GiB" if gpu["bytes"] else ""))
    else:
        w(f"  memory       {t.get('status', 'unknown')}")


def _eval_block(plan: dict, w) -> None:
    e = plan["eval"]
    w(f"Step eval  [task set {e['task_set']}, batch {e['batch_size']}, {e['dtype']}, "
      f"thresholds {e['thresholds']}]")
    w("  tasks        " + ", ".join(f"{k} {v['shots']}-shot" + (f" (first {v['limit']})" if v.get("limit") else "")
                                  + ("" if v["data"] != "missing" else " [data missing]")
                                  for k, v in e["tasks"].items()))
    if e.get("weights_bytes"):
        w(f"  weights      {fmt_bytes(e['weights_bytes'])} in {e['dtype']}")
    tk = e["tokens"]
    if tk["status"] == "counted":
        tot = tk["total"]
        w(f"  tokens       {tot['input_tokens']:,} input tokens in {tot['forward_passes']:,} forward passes "
          f"({tot['docs']:,} documents, {tot['requests']:,} requests; {tot['padded_tokens']:,} with padding at batch "
          f"{e['batch_size']}; longest {tot['max_len']}) per variant; counted in {tk['seconds']} s")
        for r in tk["tasks"]:
            w(f"    {r['task']:<14} {r['shots']:>2}-shot {r['docs']:>6} docs {r['forward_passes']:>7} passes "
              f"{r['input_tokens']:>12,} tokens (longest {r['max_len']})")
        if "total_bytes" in e:
            verdict = "" if e.get("fits") is None else ("  -> fits" if e["fits"] else "  -> does NOT fit")
            w(f"  memory       at most {fmt_bytes(e['total_bytes'])} (weights + the longest batch, {e['batch_size']} x "
              f"{tot['max_len']} tokens, with its KV cache and a materialised score matrix){verdict}")
    else:
        if tk["status"] == "needs the task data":
            w("  tokens       needs the task data (the commands are under Missing assets)")
        else:
            w(f"  tokens       {tk['status']}" + (f": {tk['command']}" if tk.get("command") else ""))
        if tk.get("then"):
            w(f"               then count them: {tk['then']}")


def _profile_block(plan: dict, w) -> None:
    from rt_lib.pipeline.plan_memory import dtype_bytes

    p, sh, gpu = plan["profile"], plan["model"].get("shape"), plan["gpu_memory"]
    w(f"Step profile  [grid {p['grid']}, {p['dtype']}, skip_k {p['skip_k']}, "
      f"{p['new_tokens']} new tokens per decode point]")
    if "status" in p:
        w(f"  KV cache     {p['status']}; {len(p['points'])} grid points")
    else:
        w(f"  KV cache     2 x {sh['layers']} layers x {sh['kv_heads']} KV heads x {sh['head_dim']} x tokens x "
          f"{dtype_bytes(p['dtype'])} bytes; 'estimate' adds activations, scores and logits "
          f"(rt_lib.speed.roofline.estimate_point_bytes); a point fits when its estimate is below "
          f"{p['headroom']:.0%} of what the weights leave free")
        unit, div = ("GiB", 2**30) if max(r["estimate_bytes"] for r in p["points"]) >= 2**30 else ("MiB", 2**20)

        def size(n):
            return "-" if n is None else f"{n / div:.2f}"
        w(f"  {'regime':<8}{'batch':>6}{'length':>8}{'new':>5}{'tokens':>11}{'KV ' + unit:>10}"
          f"{'KV skip' + str(p['skip_k']):>10}{'estimate ' + unit:>14}  fits")
        for r in p["points"]:
            fits = "?" if r["fits"] is None else ("yes" if r["fits"] else "NO")
            w(f"  {r['regime']:<8}{r['batch_size']:>6}{r['seq_len']:>8}{r['new_tokens']:>5}{r['tokens']:>11,}"
              f"{size(r['kv_bytes']):>10}{size(r['kv_bytes_skip']):>10}{size(r['estimate_bytes']):>14}  {fits}")
        if p["not_fitting"] is None:
            w("  fit          unknown: no GPU memory given (--gpu-memory 80GiB) and no CUDA device visible")
        else:
            w(f"  fit          {p['not_fitting']} of {len(p['points'])} points do not fit "
              f"{gib(gpu['bytes'])} GiB next to {fmt_bytes(p['weights_bytes'])} of weights"
              + (" (the profiler reports them as skipped)" if p["not_fitting"] else ""))
    if p.get("note"):
        w(f"  note         {p['note']}")


def _missing_block(plan: dict, w) -> None:
    if plan["missing"]:
        w(f"Missing assets ({len(plan['missing'])}): the plan went on without them")
        for x in plan["missing"]:
            w(f"  - {x['asset']} (needed by the {x['needed_by']}): {x['why']}")
            w(f"      {x['command']}")
            if x.get("alternative"):
                w(f"      or: {x['alternative']}")
    else:
        w("Missing assets: none")
