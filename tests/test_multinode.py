"""A real multi-node launch: `colossalai run --hostfile` with two "hosts", 127.0.0.2 and 127.0.0.3,
reached over SSH through an sshd this test starts on a loopback port with a throwaway key (the
openssh-server Debian package, installed here when missing and possible). It trains, saves, and a
second launch resumes bit for bit: what the README's cluster section says a user does."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import TINY_RUN, check_ok, launch_runs, read_scalars, run_outputs, script_env

from llama_recipe.distributed import free_port

pytestmark = pytest.mark.multiprocess
SSHD = "/usr/sbin/sshd"


def _ensure_sshd() -> None:
    if Path(SSHD).exists():
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("needs openssh-server (apt-get install openssh-server, as root)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=300)
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "openssh-server"]
    if subprocess.run(install, env=env, capture_output=True, timeout=600).returncode or not Path(SSHD).exists():
        pytest.skip("could not install openssh-server")


@pytest.fixture
def two_ssh_hosts(tmp_path):
    """sshd on 127.0.0.2 and 127.0.0.3 at a free port, a throwaway key in an ssh-agent; yields
    (hostfile, port, env for the launch)."""
    _ensure_sshd()
    ssh = tmp_path / "ssh"
    ssh.mkdir()
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh / name)], check=True)
    (ssh / "authorized_keys").write_text((ssh / "client.pub").read_text())
    port = free_port()
    (ssh / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.2\nListenAddress 127.0.0.3\nHostKey {ssh / 'host'}\n"
        f"PidFile {ssh / 'sshd.pid'}\nAuthorizedKeysFile {ssh / 'authorized_keys'}\nPubkeyAuthentication yes\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
        "StrictModes no\nUsePAM no\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", str(ssh / "sshd_config")], stderr=(ssh / "sshd.log").open("w"))
    agent = subprocess.run(["ssh-agent", "-s"], capture_output=True, text=True, check=True).stdout
    agent_env = dict(part.split("=", 1) for part in agent.replace(";", "\n").split() if "=" in part)
    subprocess.run(["ssh-add", str(ssh / "client")], env={**os.environ, **agent_env}, check=True, capture_output=True)
    time.sleep(0.5)
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text("127.0.0.2\n127.0.0.3\n")
    yield hostfile, port, script_env(**{k: v for k, v in agent_env.items() if k.startswith("SSH_")})
    sshd.terminate()
    subprocess.run(["kill", agent_env.get("SSH_AGENT_PID", "0")], capture_output=True)


def test_hostfile_launch_over_ssh_trains_saves_and_resumes(tmp_path, two_ssh_hosts):
    hostfile, port, env = two_ssh_hosts
    cluster = ["--hostfile", str(hostfile), "--ssh-port", str(port)]
    common = [*TINY_RUN, "-p", "ddp", "--max_steps", "4", "-o", str(tmp_path / "ckpt")]
    runs = {  # one launch: the resume starts from the step-2 checkpoint alone (a fresh model, optimizer, stream)
        "full": [*common, "-i", "2", "-t", str(tmp_path / "tb")],
        "resumed": [*common, "-i", "0", "-t", str(tmp_path / "tb2"), "-f", str(tmp_path / "ckpt" / "step-2")],
    }
    job = launch_runs(runs, tmp_path, nproc=1, env=env, launcher="colossalai", launcher_args=cluster)
    check_ok(job)
    assert "127.0.0.2: success" in job.stdout and "127.0.0.3: success" in job.stdout
    full = run_outputs(job)["full"]
    assert "2 processes, 2 data-parallel replicas" in full  # one process on each "host"
    assert "Accepted publickey" in (hostfile.parent / "ssh" / "sshd.log").read_text()  # really over SSH
    assert f"resumed from {tmp_path / 'ckpt' / 'step-2'} at step 2" in run_outputs(job)["resumed"]
    losses, resumed_losses = read_scalars(tmp_path / "tb"), read_scalars(tmp_path / "tb2")
    assert sorted(resumed_losses) == [3, 4]
    assert all(resumed_losses[s] == losses[s] for s in (3, 4))  # bit for bit, as on one machine
