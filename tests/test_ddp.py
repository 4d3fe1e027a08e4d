"""The training entry point under `accelerate launch` (two CPU processes, gloo DDP) gives the
routers of one process with the same global batch."""

import json
import textwrap
from pathlib import Path

import pytest
import torch
from accelerate_launch import accelerate_exe, launch_two
from test_train import run_small

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import sys
    from test_train import SMALL, instructions, tiny_llama
    from rt_lib.tuning.train import train_routers

    model, tok = tiny_llama()
    # 2 processes x micro batch 4 = the global batch of 8: no accumulation here
    train_routers(None, model=model, tokenizer=tok, data=instructions(), out=sys.argv[1], **{**SMALL, "max_steps": 4})
""")


@pytest.mark.slow
@pytest.mark.skipif(accelerate_exe() is None, reason="accelerate launcher not installed")
def test_two_process_ddp_equals_one_process(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT)
    # accelerate 1.15: `launch --cpu --num_processes 2` starts ONE process (multi-CPU there means
    # mpirun); `--multi_gpu` starts two through torchrun and rt_lib.tuning.train selects CPU + gloo.
    proc = launch_two("--multi_gpu", script, tmp_path / "ddp", tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp/train/summary.json").read_text())
    assert (summary["processes"], summary["gradient_accumulation"]) == (2, 1)

    single = run_small(tmp_path, "single", max_steps=4)  # 1 process: micro batch 4, accumulation 2
    assert single.summary["gradient_accumulation"] == 2

    from safetensors.torch import load_file

    ddp = load_file(str(tmp_path / "ddp/train/routers/routers.safetensors"))
    one = load_file(str(tmp_path / "single/train/routers/routers.safetensors"))
    assert ddp.keys() == one.keys()
    for k in one:
        torch.testing.assert_close(ddp[k], one[k], rtol=1e-4, atol=1e-6)
    # logged losses agree as well (reduced over processes)
    import csv

    with open(tmp_path / "ddp/train/log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["loss"]) for r in rows] == pytest.approx([r["loss"] for r in single.log], rel=1e-5)
    assert [int(r["tokens"]) for r in rows] == [r["tokens"] for r in single.log]
    # only the main process wrote: one run.json, one log, no stray temporary folders
    assert not list((tmp_path / "ddp" / "train").glob(".*"))
