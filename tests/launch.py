"""Launching test workers in several processes (2 CPU processes over gloo): a free port, the torchrun
command line, and the launch itself with a clean distributed environment."""
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str) -> list[str]:
    """``python -m torch.distributed.run`` with 2 processes on a free local port, then ``args``."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), *args]


def launch(cmd: list[str]) -> None:
    """Run ``cmd`` from the repository root without this process's RANK/WORLD_SIZE/MASTER_* settings,
    one intra-op thread per process, the repository importable; assert it succeeded."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-6000:]
