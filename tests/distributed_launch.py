"""Launch a worker script in two CPU processes with `torch.distributed.run` (gloo), on a free port, with a timeout."""

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(worker: str, *args, processes: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run tests/workers/`worker` under torch.distributed.run; returns the finished process (stdout, stderr)."""
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(ROOT / "tests" / "workers" / worker),
        *map(str, args),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
