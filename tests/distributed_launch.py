"""Launch a worker script in two CPU processes with `torch.distributed.run` (gloo), on a free port, with a timeout."""

import contextlib
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


def launch_command(worker: str, *args, processes: int = 2) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that run tests/workers/`worker` under torch.distributed.run."""
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(ROOT / "tests" / "workers" / worker),
        *map(str, args),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return command, env


def launch(worker: str, *args, processes: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run tests/workers/`worker` under torch.distributed.run; returns the finished process (stdout, stderr)."""
    command, env = launch_command(worker, *args, processes=processes)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def train_sst2_in_two_processes(tmp_path: Path, *options) -> tuple[Path, str]:
    """`fish-peft train` on a tiny local SST-2 and checkpoint in 2 processes; returns (output folder, checkpoint)."""
    from tests.glue_files import WORDS, write_glue_files
    from tests.models import save_tiny_checkpoint

    checkpoint = save_tiny_checkpoint(tmp_path / "tiny-bert", WORDS)
    train, validation = write_glue_files("sst2", tmp_path)
    out = tmp_path / "run"
    run = launch(
        "cli_worker.py", "train", ROOT / "recipes" / "glue" / "sst2.yaml", "--model", checkpoint, "--output-dir", out,
        "--train-file", train, "--validation-file", validation, "--epochs", "1", "--batch-size", "4",
        "--num-samples", "8", "--max-length", "32", *options,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return out, checkpoint


def kill_all(process: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process it started (torch.distributed.run gives its workers sessions of their
    own, so they outlive a killed launcher), as a preempted machine would lose them all."""
    import psutil  # a dependency of accelerate

    for child in [*psutil.Process(process.pid).children(recursive=True), psutil.Process(process.pid)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    process.wait()
