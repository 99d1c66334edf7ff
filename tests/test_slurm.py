"""scripts/slurm/*.sbatch under a real Slurm: a one-node cluster (slurmctld, slurmd and munged from the
Debian packages, installed here when missing and possible) with 2 CPUs on loopback, its state, spool,
ports and munge socket this test's own. finetune.sbatch trains and saves; pretrain.sbatch is told that its
time limit is near, saves, requeues itself and resumes, then is cancelled and saves again. Every daemon
it started is stopped at the end, and no process of the cluster may be left."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from conftest import PYTHON_BIN, REPO, TINY_RUN, script_env

from llama_recipe.distributed import free_port

pytestmark = [pytest.mark.multiprocess, pytest.mark.slurm]  # run by `make test-slurm`
PACKAGES = ["munge", "slurmctld", "slurmd", "slurm-client"]  # Debian's (bookworm: Slurm 22.05, munge 0.5)
STOPPED = r"SIGTERM received: stopping at the end of step (\d+)"
PROGRAMS = ["munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo"]


def _ensure_slurm() -> None:
    if all(shutil.which(p) for p in PROGRAMS):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"needs Slurm and munge (apt-get install {' '.join(PACKAGES)}, as root)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=300)
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    if subprocess.run(install, env=env, capture_output=True, timeout=600).returncode or not all(
        shutil.which(p) for p in PROGRAMS
    ):
        pytest.skip(f"could not install {' '.join(PACKAGES)}")


def _slurm_conf(root: Path) -> str:
    """A one-node cluster on loopback, everything it writes under `root`. No cgroups (a container may have
    none to give): linuxproc tracks a step's processes by their parents, which is enough to signal the
    ranks. cred_expire=5 shortens the wait Slurm imposes on a requeued job (cred_expire + 1 s, 121 s by
    default), and the schedulers look every second, so the requeued job starts within seconds."""
    return "\n".join(
        [
            "ClusterName=recipe-test",
            "SlurmctldHost=localhost(127.0.0.1)",
            "SlurmUser=root",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={root / 'munge.socket'},cred_expire=5",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool'}",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'slurmd.pid'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerParameters=sched_interval=1,bf_interval=1",
            "MpiDefault=none",
            "ReturnToService=2",
            "KillWait=60",  # the grace between scancel's SIGTERM and its SIGKILL (Slurm's default: 30 s)
            "MailProg=/bin/true",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 RealMemory=1000 State=UNKNOWN",
            "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
            "",
        ]
    )


def _wait_for(condition, timeout: float, what: str, log: Path | None = None, job: tuple[dict, str] | None = None):
    """Poll `condition` until it gives something true, and return that; fail after `timeout` seconds, or at
    once if `job` (its environment and id) has ended meanwhile. The failure shows the end of `log`."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        ended = job and _finished(*job)
        if ended or time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            why = f"job {job[1]} ended ({ended['JobState']})" if ended else f"timed out after {timeout:.0f} s"
            raise AssertionError(f"{why} waiting for {what}\n{tail}")
        time.sleep(0.2)
    return result


def _cluster_processes(conf: Path) -> list[psutil.Process]:
    """Every process that runs with this cluster's SLURM_CONF: its daemons, step daemons and job processes."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and process.environ().get("SLURM_CONF") == str(conf):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """munged, slurmctld and slurmd of a one-node cluster, started here; yields the environment a job is
    submitted from (SLURM_CONF naming that cluster, 2 ranks per node, this venv)."""
    _ensure_slurm()
    root = tmp_path_factory.mktemp("slurm")
    assert len(str(root / "munge.socket")) < 100, root  # a Unix socket's path must be short
    for name in ("state", "spool"):
        (root / name).mkdir()
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root))
    env = script_env(SLURM_CONF=str(conf), NPROC_PER_NODE="2", VENV=str(PYTHON_BIN.parent))
    munge_files = [f"--socket={root / 'munge.socket'}", f"--key-file={key}", f"--pid-file={root / 'munged.pid'}"]
    munge_files += [f"--log-file={root / 'munged.log'}", f"--seed-file={root / 'munged.seed'}"]
    commands = {  # in the foreground, so that each is this process's child and stops with it
        "munged": ["munged", "--foreground", "--force", *munge_files],  # --force: root, and a socket in /tmp
        "slurmctld": ["slurmctld", "-D", "-i"],
        "slurmd": ["slurmd", "-D", "-N", "localhost"],
    }
    daemons = {}
    try:
        for name, command in commands.items():
            daemons[name] = subprocess.Popen(
                command, env=env, stdout=(root / f"{name}.out").open("w"), stderr=subprocess.STDOUT
            )
            if name == "munged":
                _wait_for((root / "munge.socket").exists, 30, "munged's socket", root / "munged.out")

        def idle() -> bool:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
            return state.stdout.strip() == "idle"

        _wait_for(idle, 60, "the node to be idle", root / "slurmd.out")
        # what the leftover check below looks for, it finds: these daemons, now
        assert {d.pid for d in daemons.values()} <= {p.pid for p in _cluster_processes(conf)}
        yield env
    finally:
        if "slurmctld" in daemons:  # a job a failed test left: cancelled, given KillWait to end
            subprocess.run(["scancel", "--partition", "debug"], env=env, capture_output=True)
            queue = ["squeue", "-h", "-o", "%i"]
            _wait_for(lambda: not subprocess.run(queue, env=env, capture_output=True, text=True).stdout, 90, "jobs")
        for name in reversed(daemons):
            daemons[name].terminate()
            daemons[name].wait(timeout=30)
        leftovers = _cluster_processes(conf)
        for process in leftovers:
            process.kill()
        assert not leftovers, f"left running: {[(p.pid, p.name()) for p in leftovers]}"


def _submit(env: dict, script: str, log: Path, args: list[str], cwd: Path = REPO) -> str:
    """sbatch from the repository root (or `cwd`), as a user does; the sbatch options given here override the
    script's (one node, no GPUs: this cluster has none; the ranks come from NPROC_PER_NODE)."""
    options = ["--parsable", "--nodes=1", "--gpus-per-node=0", f"--output={log}"]
    command = ["sbatch", *options, str(REPO / "scripts" / "slurm" / script), *args]
    submitted = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip()


def _job(env: dict, job_id: str) -> dict[str, str]:
    """The fields of `scontrol show job` (Slurm keeps a finished job there for MinJobAge, 300 s)."""
    shown = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True)
    return dict(re.findall(r"(\w+)=(\S*)", shown.stdout))


def _finished(env: dict, job_id: str) -> dict[str, str] | None:
    job = _job(env, job_id)
    return job if job.get("JobState") in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"} else None


def _ended(env: dict, job_id: str, log: Path, timeout: float) -> dict[str, str]:
    return _wait_for(lambda: _finished(env, job_id), timeout, f"job {job_id} to end", log)


def _output(log: Path) -> str:
    return log.read_text().replace("\r", "\n")  # (the progress bar's redraws as lines)


def test_sbatch_scripts_refuse_in_one_line_before_starting_anything(slurm, tmp_path):
    """Outside a job; submitted from another directory than the checkout; no GPUs and no NPROC_PER_NODE."""
    outside = subprocess.run(["bash", "scripts/slurm/pretrain.sbatch"], cwd=REPO, env=script_env(), capture_output=True)
    assert (outside.returncode, outside.stderr) == (
        2,
        b"error: not inside a Slurm job: submit this script with sbatch\n",
    )
    no_ranks = {k: v for k, v in slurm.items() if k != "NPROC_PER_NODE"}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cases = {  # name: (the environment, the directory sbatch runs in, the one line expected)
        "elsewhere": (slurm, elsewhere, f"error: {elsewhere}/scripts/slurm/common.sh not found: run sbatch from the"),
        "no_ranks": (no_ranks, REPO, "error: no ranks per node: ask Slurm for GPUs (--gpus-per-node=N) or set NPROC"),
    }
    for name, (env, cwd, expected) in cases.items():
        log = tmp_path / f"{name}.out"
        job = _ended(slurm, _submit(env, "finetune.sbatch", log, [], cwd), log, 60)
        assert (job["JobState"], job["ExitCode"]) == ("FAILED", "2:0"), (name, log.read_text())
        (line,) = log.read_text().splitlines()
        assert line.startswith(expected), (name, line)


def test_pretrain_sbatch_saves_before_the_time_limit_requeues_resumes_and_saves_when_cancelled(slurm, tmp_path):
    """Slurm's warning before the time limit (#SBATCH --signal=B:USR1@...) is SIGUSR1 to the batch shell:
    sent here with scancel --batch, once the run has saved step 2. The ranks stop at the end of a step and save
    it; the job requeues itself and starts again, resuming from that checkpoint (--auto_resume); cancelled once
    it has saved again, its ranks save the step they are at (Slurm's SIGTERM, then SIGKILL after KillWait)."""
    log, ckpt = tmp_path / "job.out", tmp_path / "ckpt"
    args = [*TINY_RUN, "-p", "ddp", "--max_steps", "1000", "-i", "2", "-o", str(ckpt), "-t", str(tmp_path / "tb")]
    job_id = _submit(slurm, "pretrain.sbatch", log, args)

    job = (slurm, job_id)
    _wait_for((ckpt / "step-2").exists, 300, "the first checkpoint", log, job)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=slurm, check=True)
    stopped = _wait_for(lambda: re.search(STOPPED, _output(log)), 120, "the ranks to stop", log, job)
    first = int(stopped[1])

    resumed = f"resumed from {ckpt / f'step-{first}'} at step {first}"
    _wait_for(lambda: resumed in _output(log), 300, "the requeued job to resume", log, job)
    _wait_for((ckpt / f"step-{first + 2 - first % 2}").exists, 300, "a checkpoint after resuming", log, job)
    subprocess.run(["scancel", job_id], env=slurm, check=True)
    ended = _ended(slurm, job_id, log, 120)

    output = _output(log)
    assert (ended["JobState"], ended["Restarts"]) == ("CANCELLED", "1"), output[-3000:]
    assert f"slurm: job {job_id} (start 2)" in output
    assert f"slurm: the ranks saved: requeueing job {job_id}" in output
    stops = [int(step) for step in re.findall(STOPPED, output)]
    assert len(stops) == 2 and first == stops[0] < stops[1] < 1000, output[-3000:]
    for step in stops:
        assert f"saved checkpoint {ckpt / f'step-{step}'}" in output
    assert (ckpt / "latest").read_text().strip() == f"step-{stops[1]}"
