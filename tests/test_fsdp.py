"""Router-Tuning under FSDP (`accelerate launch --use_fsdp`, two CPU processes over gloo) gives the
routers of one process with the same global batch, with the frozen backbone really sharded."""

import csv
import json
import textwrap
from pathlib import Path

import pytest
import torch
from accelerate_launch import accelerate_exe, launch_two
from test_train import run_small

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path

    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from test_train import SMALL, instructions, tiny_llama
    from rt_lib.tuning.train import train_routers

    model, tok = tiny_llama()
    # 2 processes x micro batch 4 = the global batch of 8: no accumulation here
    res = train_routers(None, model=model, tokenizer=tok, data=instructions(), out=sys.argv[1],
                        **{**SMALL, "max_steps": 4})
    # how the backbone was held: sharded parameters (DTensor) of which each process keeps a part
    params = dict(res.model.named_parameters())
    layer0 = params["model.layers.0.mlp.up_proj.weight"]
    info = {
        "rank": dist.get_rank(), "fsdp_module": isinstance(res.model, FSDPModule),
        # decoder-layer weights; the root's own (embeddings, final norm, head) stay gathered
        # after a forward pass without backward, as FSDP2 does for the root
        "layer_params": sum(n.startswith("model.layers.") and "router" not in n for n in params),
        "layer_dtensors": sum(isinstance(p, DTensor) for n, p in params.items() if n.startswith("model.layers.")),
        "layer0_up_full": list(layer0.shape),
        "layer0_up_local": list(layer0.to_local().shape) if isinstance(layer0, DTensor) else list(layer0.shape),
        "routers_plain": all(not isinstance(p, DTensor) for p in res.ms.router_parameters()),
    }
    Path(sys.argv[1], f"fsdp-rank{info['rank']}.json").write_text(json.dumps(info))
""")


@pytest.mark.slow
@pytest.mark.skipif(accelerate_exe() is None, reason="accelerate launcher not installed")
def test_two_process_fsdp_equals_one_process(tmp_path):
    script = tmp_path / "fsdp_run.py"
    script.write_text(SCRIPT)
    # `--multi_gpu` starts two processes through torchrun (CPU + gloo on a machine without CUDA);
    # `--use_fsdp` sets ACCELERATE_USE_FSDP, which accelerate honours for GPU processes only: on
    # CPU processes rt_lib.tuning.tuner shards the frozen backbone itself (FSDP2, routers replicated)
    proc = launch_two("--use_fsdp", script, tmp_path / "fsdp", tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "fsdp/train/summary.json").read_text())
    assert (summary["processes"], summary["gradient_accumulation"]) == (2, 1)

    # the backbone was sharded: every process holds half of each (even) weight matrix
    infos = [json.loads((tmp_path / f"fsdp/fsdp-rank{r}.json").read_text()) for r in (0, 1)]
    for info in infos:
        assert info["fsdp_module"] and info["routers_plain"]
        assert info["layer_dtensors"] == info["layer_params"] == 6 * 9  # every layer weight but the routers
        assert info["layer0_up_full"] == [64, 32] and info["layer0_up_local"] == [32, 32]

    single = run_small(tmp_path, "single", max_steps=4)  # 1 process: micro batch 4, accumulation 2
    assert single.summary["gradient_accumulation"] == 2

    from safetensors.torch import load_file

    fsdp = load_file(str(tmp_path / "fsdp/train/routers/routers.safetensors"))
    one = load_file(str(tmp_path / "single/train/routers/routers.safetensors"))
    assert fsdp.keys() == one.keys()
    for k in one:
        torch.testing.assert_close(fsdp[k], one[k], rtol=1e-4, atol=1e-6)
    assert any(one[k].abs().sum() > 0 for k in one)  # the routers moved
    with open(tmp_path / "fsdp/train/log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["loss"]) for r in rows] == pytest.approx([r["loss"] for r in single.log], rel=1e-5)
    assert [int(r["tokens"]) for r in rows] == [r["tokens"] for r in single.log]
    assert summary["heldout_lm_loss"]["tuned"] == pytest.approx(single.summary["heldout_lm_loss"]["tuned"], rel=1e-5)
    assert not list((tmp_path / "fsdp" / "train").glob(".*"))
