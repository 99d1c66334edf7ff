"""The README's front door, run as written from a clean clone: `make demo`, then the CPU commands
after it in the README's order (eval.py on the demo checkpoint, serve.py and a request to it, the
export, the finetune, generate.py), each in a fresh shell that has only what the README says to do
(`source .venv/bin/activate`). The demo's printed lines must be the README's sample output.

The clone is of the committed HEAD (commit before running this test on a changed tree). Its `.venv`
is this test's own, linked (no install), with a fresh `.installed` stamp, so `make demo` runs the
demo and installs nothing; PYTHONPATH names the clone, because the venv's editable install of
`llama_recipe` points at the checkout it was installed from.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PYTHON_BIN, REPO

from llama_recipe.server import wait_until_healthy

pytestmark = pytest.mark.multiprocess

# The README's CPU commands after `make demo`, by how each starts, in the order a user meets them
# (the GPU, cluster and hub ones are left out). Each runs after the README's `source ...` lines
# above it, as in the shell of a user who typed them in order.
FRONT_DOOR = [
    "make demo",
    "python eval.py --model_path runs/demo/",
    "python serve.py",
    "curl",
    "python scripts/export_hf.py",
    "torchrun --standalone --nproc_per_node 2 finetune.py",
    "python scripts/generate.py",
]
SERVED = "http://127.0.0.1:8000"  # serve.py's default, which the README's request uses


def readme_commands(readme: str) -> list[str]:
    """Every command of the README's bash blocks, in order, with its continuation lines joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme, re.S):
        commands += [c.strip() for c in re.split(r"(?<!\\)\n", block) if c.strip()]
    return commands


def front_door(readme: str) -> dict[str, str]:
    """FRONT_DOOR's commands: the first in the README that starts with each (they must come in that
    order), each as a script with the README's `source` lines above it first."""
    commands = readme_commands(readme)
    found = {start: next((i for i, c in enumerate(commands) if c.startswith(start)), None) for start in FRONT_DOOR}
    assert None not in found.values(), f"the README lacks {[s for s, i in found.items() if i is None]}"
    assert list(found.values()) == sorted(found.values()), f"the README's front door is out of order: {found}"
    return {
        start: "\n".join([*(c for c in commands[:i] if c.startswith("source ")), commands[i]])
        for start, i in found.items()
    }


def sample_differences(readme: str, printed: str) -> list[tuple[str, str]]:
    """(README, printed) pairs of the README's sample output lines that `make demo` did not print: all
    but the speed and memory figures of the `done:` line, which vary from machine to machine."""
    sample = readme.split("```\ndone: ", 1)[1].split("```", 1)[0].splitlines()
    ran = printed[printed.index("done: ") + len("done: ") :].splitlines()[: len(sample)]
    pairs = zip(sample, ran + [""] * (len(sample) - len(ran)), strict=True)
    return [(ours, theirs) for ours, theirs in pairs if _figures(ours) != _figures(theirs)]


def _figures(line: str) -> str:
    return line.split(" tokens/s")[0].rsplit(", ", 1)[0] if " tokens/s" in line else line


def clean_clone(root: Path) -> Path:
    """`git clone` of this repository, with a `.venv` that is this test's venv (linked, not installed)."""
    clone = root / "clone"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True, capture_output=True)
    venv = Path(sys.prefix)
    assert venv != Path(sys.base_prefix), "run the tests from the venv (`make test`)"
    (clone / ".venv").mkdir()
    for entry in venv.iterdir():
        if entry.name != ".installed":
            (clone / ".venv" / entry.name).symlink_to(entry)
    (clone / ".venv" / ".installed").touch()  # newer than the clone's requirements: `make demo` installs nothing
    return clone


def fresh_shell_env(clone: Path) -> dict[str, str]:
    """This environment as a new login shell has it: no venv on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and Path(p).resolve() != PYTHON_BIN.resolve()]
    return dict(env, PATH=os.pathsep.join(path), PYTHONPATH=str(clone), OMP_NUM_THREADS="1")


def test_the_readme_front_door_runs_as_written(tmp_path):
    readme = (REPO / "README.md").read_text()
    commands = front_door(readme)
    clone = clean_clone(tmp_path)
    env = fresh_shell_env(clone)
    took = {}

    def shell(start: str, **popen) -> subprocess.CompletedProcess | subprocess.Popen:
        """The README's command in a new bash (waited for, unless Popen arguments are given)."""
        script = commands[start]
        if popen:
            return subprocess.Popen(["bash", "-c", script], cwd=clone, env=env, **popen)
        began = time.monotonic()
        proc = subprocess.run(["bash", "-c", script], cwd=clone, env=env, capture_output=True, text=True, timeout=300)
        took[start] = time.monotonic() - began
        assert proc.returncode == 0, (
            f"{commands[start]}\nexit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
        return proc

    demo = shell("make demo")
    assert not sample_differences(readme, demo.stdout), "the README's sample output is not what `make demo` prints"

    assert not _listening(SERVED), f"{SERVED} is taken: the README's serve.py command needs its port"
    log = (tmp_path / "serve.log").open("w")
    server = shell("python serve.py", stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # (started first: it loads its model while eval.py scores, one core each)
        assert "token perplexity" in shell("python eval.py --model_path runs/demo/").stdout
        _wait_for(server, tmp_path / "serve.log")
        reply = json.loads(shell("curl").stdout)
        assert reply["object"] == "chat.completion" and isinstance(reply["choices"][0]["message"]["content"], str)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)

    shell("python scripts/export_hf.py")
    finetuned = shell("torchrun --standalone --nproc_per_node 2 finetune.py")
    answer = shell("python scripts/generate.py").stdout.split("--- answer:\n", 1)[1].strip()
    _check_answers(clone, commands["python scripts/generate.py"], answer, finetuned.stdout)
    print("seconds per command:", {k: round(v, 1) for k, v in took.items()})


def _listening(url: str) -> bool:
    try:
        wait_until_healthy(url, timeout=0)
    except TimeoutError:
        return False
    return True


def _wait_for(server: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Until serve.py answers /health; its output if it exits first."""
    deadline = time.monotonic() + timeout
    while not _listening(SERVED):
        assert server.poll() is None, f"serve.py exited {server.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"serve.py did not answer within {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


def _check_answers(clone: Path, generate_command: str, answer: str, finetune_stdout: str) -> None:
    """generate.py answered from the finetuned model (not the export it started from), and finetune.py's
    printed answer to its first held-out prompt is that model's too: both as `instruct.shown_answer`
    shows them (a note where the answer is blank)."""
    import torch

    from llama_recipe.checkpoint_paths import resolve_checkpoint
    from llama_recipe.data import load_model_tokenizer
    from llama_recipe.generation import Generator, Sampling
    from llama_recipe.instruct import load_instruction_rows, shown_answer, split_held_out
    from llama_recipe.model import load_pretrained_model

    model_dir = resolve_checkpoint(str(clone / "runs" / "finetune" / "latest"), "generate.py")
    tokenizer = load_model_tokenizer(model_dir)
    generator = Generator(load_pretrained_model(model_dir), tokenizer)
    exported = load_pretrained_model(clone / "exported" / "llama-tiny")
    assert not torch.equal(generator.model.lm_head.weight, exported.lm_head.weight)

    def shown(prompt: str) -> str:
        return shown_answer(generator.complete(prompt, Sampling()), tokenizer.eos_token_id)

    assert answer == shown(shlex.split(generate_command.splitlines()[-1])[3])  # python scripts/generate.py MODEL PROMPT
    _, held_out = split_held_out(
        load_instruction_rows(str(clone / "data" / "self_instruct"), "self_instruct"), 0.05, 42
    )
    printed = finetune_stdout.split("--- model answer:\n", 1)[1].split("\n--- held-out prompt:", 1)[0].strip()
    assert printed == shown(held_out[0]["prompt"])
