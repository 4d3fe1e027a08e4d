"""Launch a test script in 2 CPU processes with `accelerate launch` (DDP and FSDP tests)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def accelerate_exe() -> str | None:
    exe = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    return exe if Path(exe).exists() else None


def launch_two(flag: str, script: Path, out: Path, cwd: Path) -> subprocess.CompletedProcess:
    """`accelerate launch <flag> --num_processes 2` of `script out` on CPU (one thread each)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [accelerate_exe(), "launch", flag, "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(out)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=cwd)
