"""A rank that dies or hangs ends the run within --dist_timeout, with a message saying so, and the last
checkpoint resumes; a run of one process opens no port at all."""

from __future__ import annotations

import signal
import time

import psutil
import pytest
from conftest import TINY_RUN, check_ok, launch, one_rank_process_group, read_scalars, run_in_process, signal_job

TIMEOUT_S = 10


def test_a_single_process_run_listens_on_loopback_only():
    """Its rendezvous goes through a file (a TCP store would listen on every interface); what gloo
    itself opens is on loopback."""
    with one_rank_process_group():
        listening = [c for c in psutil.Process().net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert all(c.laddr.ip in ("127.0.0.1", "::1") for c in listening), listening


def _worker(job, rank: int) -> psutil.Process:
    for child in psutil.Process(job.pid).children(recursive=True):
        try:
            if "pretrain.py" in " ".join(child.cmdline()) and child.environ().get("RANK") == str(rank):
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no worker of rank {rank}")


def _start(tmp_path, background_jobs):
    """A 2-process zero2 run with --dist_timeout 20 s, waited for until its step-2 checkpoint exists."""
    save_dir = tmp_path / "ckpt"
    args = [*TINY_RUN, "-p", "zero2", "--max_steps", "500", "-i", "2", "--dist_timeout", str(TIMEOUT_S)]
    job = launch("pretrain.py", [*args, "-o", str(save_dir), "-t", ""], nproc=2, log=tmp_path / "log.txt")
    background_jobs.append(job)
    deadline = time.time() + 180
    while not (save_dir / "latest").exists() and time.time() < deadline and job.poll() is None:
        time.sleep(0.2)
    assert (save_dir / "latest").exists(), (tmp_path / "log.txt").read_text()[-3000:]
    return job, save_dir


def _resumes(tmp_path, save_dir) -> None:
    """The last checkpoint loads and trains on (in this process: weights and optimizer resharded to
    one replica; the stream restarts, --reset_data, as it cannot move to another layout)."""
    step = int((save_dir / "latest").read_text().strip().split("-")[1])
    args = [*TINY_RUN, "-p", "zero2", "-b", "4", "--max_steps", str(step + 1), "--reset_schedule", "--reset_data"]
    proc = run_in_process("pretrain.py", [*args, "-f", "latest", "-o", str(save_dir), "-t", str(tmp_path / "tb2")])
    check_ok(proc)
    assert f"resumed from {save_dir / f'step-{step}'} at step {step}" in proc.stdout
    assert list(read_scalars(tmp_path / "tb2")) == [step + 1]


@pytest.mark.multiprocess
def test_a_killed_rank_ends_the_run_and_the_last_checkpoint_resumes(tmp_path, background_jobs):
    job, save_dir = _start(tmp_path, background_jobs)
    killed = time.perf_counter()
    _worker(job, 1).send_signal(signal.SIGKILL)
    job.wait(timeout=TIMEOUT_S + 60)
    elapsed = time.perf_counter() - killed
    assert job.returncode != 0 and elapsed < TIMEOUT_S + 30, (job.returncode, elapsed)
    print(f"killed rank 1: the job ended {elapsed:.1f} s later")  # for the record (pytest -s)
    _resumes(tmp_path, save_dir)


@pytest.mark.multiprocess
def test_a_stuck_rank_ends_the_run_within_the_timeout(tmp_path, background_jobs):
    job, save_dir = _start(tmp_path, background_jobs)
    stuck = _worker(job, 1)
    stopped = time.perf_counter()
    stuck.send_signal(signal.SIGSTOP)  # alive but never answering
    deadline = time.time() + TIMEOUT_S + 90
    while "a collective operation failed" not in (tmp_path / "log.txt").read_text() and time.time() < deadline:
        time.sleep(0.5)
    detected = time.perf_counter() - stopped
    log = (tmp_path / "log.txt").read_text()
    assert f"a rank is dead, stuck or unreachable (--dist_timeout {TIMEOUT_S} s)" in log, log[-3000:]
    assert TIMEOUT_S * 0.5 < detected < TIMEOUT_S + 30, detected  # the bound, not gloo's 30 minutes
    print(f"stuck rank 1: rank 0 stopped {detected:.1f} s later")
    try:
        stuck.send_signal(signal.SIGCONT)
    except psutil.NoSuchProcess:
        pass
    signal_job(job, signal.SIGKILL)
    job.wait(timeout=60)
    _resumes(tmp_path, save_dir)
