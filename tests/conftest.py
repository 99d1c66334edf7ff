"""Shared helpers: launch the real scripts with torchrun on CPU, read back TensorBoard scalars."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llama_recipe.metrics import read_scalars  # noqa: F401  (the tests import it from here)

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data" / "redpajama-sample"
PYTHON_BIN = Path(sys.executable).parent
TINY_RUN = ["-c", "tiny", "-d", str(DATA), "-l", "128", "-b", "2", "-s", "0", "--lr", "5e-3"]


def script_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PATH"] = f"{PYTHON_BIN}{os.pathsep}{env.get('PATH', '')}"  # torchrun / colossalai of this venv
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def run_script(script: str, args: list[str], nproc: int = 1, env: dict | None = None, timeout: int = 300):
    """Run a top-level script, under torchrun when nproc > 1. Returns the CompletedProcess."""
    if nproc > 1:
        cmd = [str(PYTHON_BIN / "torchrun"), "--standalone", "--nproc_per_node", str(nproc), script, *args]
    else:
        cmd = [sys.executable, script, *args]
    return subprocess.run(cmd, cwd=REPO, env=env or script_env(), capture_output=True, text=True, timeout=timeout)


def check_ok(proc) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    )


def expect_one_line_error(proc, *keywords: str) -> str:
    """Bad input: exit code 2, exactly one line on stderr starting with "error:", naming each keyword; no traceback."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for keyword in keywords:
        assert keyword in lines[0], lines[0]
    return lines[0]


@pytest.fixture(autouse=True)
def _restore_torch_state():
    import torch

    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
