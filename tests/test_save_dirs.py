"""Where runs save and what they load: a fresh run never writes over another run's checkpoints in
its -o (the refusal, --replace_checkpoints, a finished run resumed again as a second `make demo`),
every script takes every name of a checkpoint, and the save-directory lock has one holder however
many runs start at the same instant."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    DATA,
    INSTRUCT_DATA,
    REPO,
    TINY_RUN,
    check_ok,
    expect_one_line_error,
    launch,
    run_in_process,
    script_env,
    signal_job,
    write_jsonl,
)


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def _wait_for(condition, job, seconds: float = 180) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert job.poll() is None and time.time() < deadline, "the run ended (or took too long) before it got there"
        time.sleep(0.1)


@pytest.mark.multiprocess
def test_a_used_save_dir_is_refused_and_replaced_only_once_the_new_run_saved(tmp_path, background_jobs):
    """Run 1 saves step-1 and step-2. A fresh run 2 on the same -o is refused before writing; resumed
    with --auto_resume at its --max_steps it says so and exits 0 (a second `make demo`); with
    --replace_checkpoints (a real process) run 1's checkpoints and TensorBoard events wait intact in
    -o/.replaced-*/, out of `latest`'s view, until run 2 has saved (here: on SIGTERM), then they are gone."""
    save_dir = tmp_path / "ckpt"
    first = [*TINY_RUN, "-p", "ddp", "-l", "64", "--seed", "1", "-o", str(save_dir)]
    check_ok(run_in_process("pretrain.py", [*first, "--max_steps", "2", "-i", "1"]))
    before = _hashes(save_dir)
    assert (save_dir / "latest").read_text().strip() == "step-2"

    second = [*TINY_RUN, "-p", "ddp", "-l", "64", "--seed", "2", "-o", str(save_dir)]
    refused = run_in_process("pretrain.py", [*second, "--max_steps", "2"])
    expect_one_line_error(
        refused,
        f"-o {save_dir} holds another run's checkpoints",
        str(save_dir / "step-2"),
        "-f latest",
        "--auto_resume",
        "new -o",
        "--replace_checkpoints",
    )
    assert _hashes(save_dir) == before

    finished = run_in_process("pretrain.py", [*first, "--max_steps", "2", "--auto_resume"])
    check_ok(finished)
    assert finished.stdout.strip() == (
        f"nothing to train: {save_dir / 'step-2'} is already at step 2 of --max_steps 2; to train on, pass a larger "
        "--max_steps with --reset_schedule; to start another run, pass a new -o"
    )
    assert _hashes(save_dir) == before

    job = launch(
        "pretrain.py", [*second, "--max_steps", "500", "-i", "0", "--replace_checkpoints"], log=tmp_path / "log.txt"
    )
    background_jobs.append(job)
    _wait_for(lambda: "--replace_checkpoints: moved" in (tmp_path / "log.txt").read_text(), job)
    (aside,) = save_dir.glob(".replaced-*")
    assert _hashes(aside) == before  # every file of run 1, intact
    assert not (save_dir / "latest").exists() and not list(save_dir.glob("step-*"))
    assert f"mv {aside}/* {save_dir}/ && rmdir {aside}" in (tmp_path / "log.txt").read_text()  # how to get them back
    _wait_for(lambda: "pretraining:" in (tmp_path / "log.txt").read_text(), job)
    assert _hashes(aside) == before  # still there while run 2 trains
    signal_job(job, 15)  # SIGTERM: run 2 saves the step it is at, and exits
    assert job.wait(timeout=120) == 0, (tmp_path / "log.txt").read_text()[-3000:]
    latest = save_dir / (save_dir / "latest").read_text().strip()
    assert json.loads((latest / "running_states.json").read_text())["config"]["seed"] == 2
    assert not aside.exists() and sorted(p.name for p in save_dir.iterdir()) == ["latest", latest.name, "tensorboard"]
    assert (
        f"deleted the earlier run's checkpoints in {aside}: this run saved {latest}"
        in (tmp_path / "log.txt").read_text()
    )


# ---------------------------------------------------------------------------------------------
# Every script takes every name of a checkpoint: a step-<N>, a run's `latest` file, the run's
# directory (its latest), and where a script takes weights, an exported Hugging Face directory.

SPELLINGS = {
    "step": lambda run, hf: run / "step-6",
    "latest_file": lambda run, hf: run / "latest",
    "run_directory": lambda run, hf: run,
    "hf_directory": lambda run, hf: hf,
}
FINETUNE = [
    "-d",
    str(INSTRUCT_DATA),
    "--task_name",
    "self_instruct",
    "-l",
    "32",
    "-b",
    "1",
    "--max_steps",
    "1",
    "-i",
    "0",
    "--eval_split",
    "0",
]
INIT_FROM = ["-d", str(DATA), "-l", "32", "-b", "1", "--max_steps", "1", "-i", "0"]


def _names_case(script: str, spelling: str, name: Path, tmp: Path, step6: Path):
    """(the script's arguments, what its output must show) for `name`; only the HF directory
    differs between spellings, and for -f and export_hf.py it is refused, naming their own flag."""
    weights = name if spelling == "hf_directory" else step6 / "model"  # what the name must resolve to
    out = ["-o", str(tmp / "o"), "-t", ""]
    if script == "pretrain -f":  # resuming a finished run: it resolves the name, then has nothing to train
        args = [*TINY_RUN, "-p", "zero2", "--max_steps", "6", "--reset_data", "-f", str(name), *out]
        return args, f"nothing to train: {step6} is already at step 6"
    if script == "pretrain --init_from":
        return [*INIT_FROM, "--init_from", str(name), *out], f"continued pretraining from {weights} "
    if script == "finetune":
        return ["--model_path", str(name), *FINETUNE, *out], "done: 1 steps this run"
    if script == "eval":
        doc = write_jsonl(tmp / "doc.jsonl", ["A short document to score."])
        return ["--model_path", str(name), "-d", str(doc), "-l", "32"], "token perplexity"
    if script == "generate":
        return [str(name), "Hello", "--max_new_tokens", "1"], "--- answer:"
    return [str(name), str(tmp / "exported")], f"exported {name} to {tmp / 'exported'}"  # export_hf


SCRIPTS = {
    "pretrain -f": "pretrain.py",
    "pretrain --init_from": "pretrain.py",
    "finetune": "finetune.py",
    "eval": "eval.py",
    "generate": "scripts/generate.py",
    "export_hf": "scripts/export_hf.py",
}
REFUSED = {"pretrain -f": ("-f", "--model_path"), "export_hf": ("export_hf.py", "-f")}  # (named, never named)


@pytest.mark.multiprocess  # layout_runs("zero2") launches the run whose checkpoints these read (once a session)
@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_takes_every_name_of_a_checkpoint(layout_runs, pretrained_dir, tmp_path, script, spelling):
    run = layout_runs("zero2")["root"] / "ckpt"  # step-3 .. step-6, latest: step-6
    name = SPELLINGS[spelling](run, pretrained_dir)
    args, shown = _names_case(script, spelling, name, tmp_path, run / "step-6")
    proc = run_in_process(SCRIPTS[script], args)
    if spelling == "hf_directory" and script in REFUSED:
        named, never = REFUSED[script]
        line = expect_one_line_error(
            proc, str(name), "is a model directory, not a step-<N> checkpoint", f"pass {named} "
        )
        assert never not in line.replace(named, "")
        return
    check_ok(proc)
    assert shown in proc.stdout


@pytest.mark.multiprocess
@pytest.mark.parametrize("spelling", SPELLINGS)
def test_serve_takes_every_name_of_a_checkpoint(layout_runs, pretrained_dir, spelling):
    from fastapi.testclient import TestClient

    from llama_recipe.server import load_server

    name = SPELLINGS[spelling](layout_runs("zero2")["root"] / "ckpt", pretrained_dir)
    with TestClient(load_server(str(name)).app) as client:
        answer = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 1, "temperature": 0})
    assert answer.status_code == 200 and answer.json()["model"] == str(name)


# ---------------------------------------------------------------------------------------------
# The save-directory lock

LOCK_WORKER = """
import os, sys, time
from pathlib import Path
from llama_recipe.save_lock import SaveDirLock
from llama_recipe.errors import UsageError

work, rounds, n = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
(work / f"ready-{os.getpid()}").write_text("")
for r in range(rounds):
    while not (work / f"go-{r}").exists():
        time.sleep(0.0002)  # every worker asks for the lock within a fraction of a millisecond of the others
    try:
        with SaveDirLock(str(work / "ckpt")):
            outcome, held = "won", time.time()
            while len(list(work.glob(f"r{r}-*"))) < n - 1 and time.time() < held + 5:  # until the others were refused
                time.sleep(0.001)
    except UsageError as e:
        outcome = str(e)
    (work / f".r{r}-{os.getpid()}").write_text(outcome)
    os.rename(work / f".r{r}-{os.getpid()}", work / f"r{r}-{os.getpid()}")
"""


@pytest.mark.multiprocess
def test_the_save_dir_lock_has_one_holder_when_runs_start_at_the_same_instant(tmp_path):
    """4 processes take the real SaveDirLock on one -o at the same instant, 3 rounds: each round
    exactly one holds it, the others are refused naming it (pid, host, since), and it is released
    (no lock file) before the next round. (-o itself may stay, empty, when a refused run was the one
    that made it: a run removes only a directory it made.)"""
    n, rounds = 4, 3
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", LOCK_WORKER, str(tmp_path), str(rounds), str(n)],
            cwd=REPO,
            env=script_env(PYTHONPATH=str(REPO)),
        )
        for _ in range(n)
    ]
    try:
        deadline = time.time() + 120
        while len(list(tmp_path.glob("ready-*"))) < n:
            assert time.time() < deadline and all(w.poll() is None for w in workers)
            time.sleep(0.1)
        for r in range(rounds):
            (tmp_path / f"go-{r}").write_text("")
            while len(list(tmp_path.glob(f"r{r}-*"))) < n:
                assert time.time() < deadline + 60 and all(w.poll() in (None, 0) for w in workers)
                time.sleep(0.01)
            outcomes = {p.name.split("-")[1]: p.read_text() for p in tmp_path.glob(f"r{r}-*")}
            winners = [pid for pid, outcome in outcomes.items() if outcome == "won"]
            assert len(winners) == 1, (r, outcomes)
            for outcome in outcomes.values():
                assert outcome == "won" or f"another run (pid {winners[0]} on " in outcome and ", since 20" in outcome
            while (tmp_path / "ckpt" / ".lock").exists():  # the winner leaves no lock behind
                assert time.time() < deadline + 60
                time.sleep(0.01)
        assert [w.wait(timeout=60) for w in workers] == [0] * n
    finally:
        for w in workers:
            w.kill()


HALFWAY_HOLDER = """
import fcntl, json, os, socket, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)  # what SaveDirLock's filelock does first
print("locked", flush=True)
time.sleep(0.5)  # a holder slow to write its name (a loaded machine, a network filesystem)
os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": "2030-01-01T00:00:00"}).encode())
time.sleep(60)
"""


@pytest.mark.multiprocess
def test_a_lock_whose_holder_has_not_written_its_name_yet_is_never_taken_over(tmp_path):
    """The moment between taking the lock and writing the holder's name, held open: a second run
    waits for the name and is refused naming it (before the fix it took the empty file for a stale
    lock and took it over)."""
    from llama_recipe.errors import UsageError
    from llama_recipe.save_lock import SaveDirLock

    (tmp_path / "ckpt").mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HALFWAY_HOLDER, str(tmp_path / "ckpt" / ".lock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UsageError, match=f"another run \\(pid {holder.pid} on .*, since 2030-01-01T00:00:00\\)"):
            with SaveDirLock(str(tmp_path / "ckpt")):
                pass
        assert holder.poll() is None and json.loads((tmp_path / "ckpt" / ".lock").read_text())["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()
