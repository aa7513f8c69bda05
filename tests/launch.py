"""Run the CLI the way a multi-GPU user does, on the CPU: `accelerate launch` with two processes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def launch_two_processes(argv: list[str], *, timeout: int = 900) -> subprocess.CompletedProcess:
    """`python -m customgen ARGV` under `accelerate launch --cpu --num_processes 2`, offline, one thread a process."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "customgen", *argv]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
