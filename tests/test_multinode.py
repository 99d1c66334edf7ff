"""A real multi-node launch: `colossalai run --hostfile` with two "hosts", 127.0.0.2 and 127.0.0.3,
reached over SSH through an sshd on a loopback port with a throwaway key (conftest's two_ssh_hosts).
It trains, saves, and a second launch resumes bit for bit: what the README's cluster section says a
user does."""

from __future__ import annotations

import pytest
from conftest import TINY_RUN, check_ok, launch_runs, read_scalars, run_outputs

pytestmark = pytest.mark.multiprocess


def test_hostfile_launch_over_ssh_trains_saves_and_resumes(tmp_path, two_ssh_hosts):
    hosts = two_ssh_hosts
    cluster = ["--hostfile", str(hosts.hostfile), "--ssh-port", str(hosts.port)]
    common = [*TINY_RUN, "-p", "ddp", "--max_steps", "4", "-o", str(tmp_path / "ckpt")]
    runs = {  # one launch: the resume starts from the step-2 checkpoint alone (a fresh model, optimizer, stream)
        "full": [*common, "-i", "2", "-t", str(tmp_path / "tb")],
        "resumed": [*common, "-i", "0", "-t", str(tmp_path / "tb2"), "-f", str(tmp_path / "ckpt" / "step-2")],
    }
    job = launch_runs(runs, tmp_path, nproc=1, env=hosts.env, launcher="colossalai", launcher_args=cluster)
    check_ok(job)
    assert "127.0.0.2: success" in job.stdout and "127.0.0.3: success" in job.stdout
    full = run_outputs(job)["full"]
    assert "2 processes, 2 data-parallel replicas" in full  # one process on each "host"
    assert "Accepted publickey" in hosts.log.read_text()  # really over SSH
    assert f"resumed from {tmp_path / 'ckpt' / 'step-2'} at step 2" in run_outputs(job)["resumed"]
    losses, resumed_losses = read_scalars(tmp_path / "tb"), read_scalars(tmp_path / "tb2")
    assert sorted(resumed_losses) == [3, 4]
    assert all(resumed_losses[s] == losses[s] for s in (3, 4))  # bit for bit, as on one machine
