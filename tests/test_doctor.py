"""scripts/doctor.py on a loopback cluster (conftest's two_ssh_hosts: a real sshd on 127.0.0.2 and
127.0.0.3): it passes the healthy cluster with the all-reduce's bandwidth, and finds each fault,
injected one at a time into one host, with one line and exit 2. 127.0.0.3 differs from this machine
through what its sessions run first (`fault`): an environment (a package version, a clock), or a
mount namespace where a path is hidden, read-only or full. The hostfile rules are checked in-process."""

from __future__ import annotations

import importlib.metadata
import os
import socket
import subprocess
import sys

import pytest
from conftest import REPO

from llama_recipe.distributed import free_port
from llama_recipe.doctor import Probe, clock_skew, read_hostfile
from llama_recipe.errors import UsageError

MOUNT_NS = "unshare -m" if os.geteuid() == 0 else "unshare -rm"  # a user namespace lets a non-root user mount


def _doctor(hosts, hostfile, save_dir, *extra: str, timeout: int = 120) -> subprocess.CompletedProcess:
    args = ["--hostfile", str(hostfile), "-o", str(save_dir), "--ssh-port", str(hosts.port), "--min_free_gb", "0.5"]
    command = [sys.executable, "scripts/doctor.py", *args, *extra]
    return subprocess.run(command, cwd=REPO, env=hosts.env, capture_output=True, text=True, timeout=timeout)


def _one_error(run: subprocess.CompletedProcess, start: str) -> str:
    """The doctor's only problem line (exit 2), after ok lines for the checks before it."""
    assert run.returncode == 2, (run.stdout, run.stderr)
    (line,) = run.stderr.splitlines()
    assert line.startswith(f"error: {start}"), line
    assert all(ok.startswith("ok: ") for ok in run.stdout.splitlines()), run.stdout
    return line


def _inject_one_at_a_time(hosts, save_dir, faults: dict[str, str]) -> None:
    """Each fault (what 127.0.0.3's sessions run first) alone: the doctor's one line starts as given."""
    try:
        for fault, start in faults.items():
            hosts.fault.write_text(fault)
            _one_error(_doctor(hosts, hosts.hostfile, save_dir), start)
    finally:
        hosts.fault.write_text("")


def _in_mount_namespace(mount: str) -> str:
    """A fault: 127.0.0.3's session runs in its own mount namespace after `mount` (only there)."""
    return f'exec {MOUNT_NS} sh -c \'{mount} && exec "$SHELL" -c "$SSH_ORIGINAL_COMMAND"\'\n'


@pytest.mark.multiprocess
def test_doctor_passes_a_healthy_cluster_and_measures_the_allreduce(tmp_path, two_ssh_hosts):
    run = _doctor(
        two_ssh_hosts,
        two_ssh_hosts.hostfile,
        tmp_path / "ckpt",
        "--allreduce_mb",
        "16",
        "--master_port",
        str(free_port()),
    )
    assert run.returncode == 0, (run.stdout, run.stderr)
    lines = run.stdout.splitlines()
    assert [line.split(":")[1].strip() for line in lines] == [
        "ssh",
        "paths",
        "packages",
        "clocks",
        "save_dir",
        "master port",
        "launcher",
        "all-reduce",
    ]
    assert lines[0] == "ok: ssh: 2 host(s) answer password-less ssh (127.0.0.2, 127.0.0.3)"
    assert lines[-1].startswith("ok: all-reduce: 16 MB across 2 ranks (gloo): ") and lines[-1].endswith(
        " GB/s bus bandwidth"
    )
    assert not (tmp_path / "ckpt").exists()  # -o was written to and left as it was


@pytest.mark.multiprocess
def test_doctor_finds_each_fault_with_one_line(tmp_path, two_ssh_hosts):
    hosts, save_dir = two_ssh_hosts, tmp_path / "ckpt"
    save_dir.mkdir()
    fake = tmp_path / "fake"  # another transformers, first on 127.0.0.3's sys.path
    (fake / "transformers-0.0.1.dist-info").mkdir(parents=True)
    (fake / "transformers-0.0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: transformers\nVersion: 0.0.1\n"
    )
    slow = tmp_path / "slow"  # 127.0.0.3's python sees a clock a minute behind
    slow.mkdir()
    (slow / "sitecustomize.py").write_text("import time\n_time = time.time\ntime.time = lambda: _time() - 60\n")
    here = importlib.metadata.version("transformers")
    _inject_one_at_a_time(
        hosts,
        save_dir,
        {  # the fault on 127.0.0.3 -> the start of the doctor's line
            f"export PYTHONPATH={fake}\n": f"packages: 127.0.0.3 has transformers 0.0.1 (here {here}): install the same versions",
            f"export PYTHONPATH={slow}\n": "clocks: 127.0.0.3's clock is ",
        },
    )
    silent = tmp_path / "hosts-silent.txt"
    silent.write_text("127.0.0.2\n127.0.0.4  # nobody listens there\n")
    line = _one_error(_doctor(hosts, silent, save_dir), "ssh: host 127.0.0.4 does not answer password-less ssh (")
    assert "Connection refused" in line and f"'ssh -o BatchMode=yes -p {hosts.port} 127.0.0.4 true'" in line
    with socket.socket() as busy:  # the master port, taken on the master (the first host)
        busy.bind(("127.0.0.2", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = _one_error(_doctor(hosts, hosts.hostfile, save_dir, "--master_port", str(port)), "master port: ")
    assert line.startswith(f"error: master port: {port} is in use on 127.0.0.2 (Address already in use): ")


@pytest.mark.multiprocess
def test_doctor_finds_a_missing_repository_and_an_unusable_save_dir(tmp_path, two_ssh_hosts):
    if subprocess.run([*MOUNT_NS.split(), "true"], capture_output=True).returncode:
        pytest.skip(f"`{MOUNT_NS}` is not allowed here: no mount namespace for 127.0.0.3")
    save_dir = tmp_path / "ckpt"
    save_dir.mkdir()
    _inject_one_at_a_time(
        two_ssh_hosts,
        save_dir,
        {
            _in_mount_namespace(
                f"mount -t tmpfs none {REPO}"
            ): f"paths: 127.0.0.3 has no {REPO / 'pretrain.py'}: put the repository",
            _in_mount_namespace(
                f"mount --bind -o ro {save_dir} {save_dir}"
            ): f"save_dir: 127.0.0.3 cannot write to {save_dir} (Read-only file system): -o must name",
            _in_mount_namespace(
                f"mount -t tmpfs -o size=1m none {save_dir}"
            ): f"save_dir: 127.0.0.3 has 0.0 GB free at {save_dir}, under --min_free_gb 0.5",
        },
    )


def test_hostfile_rules_are_the_launch_scripts(tmp_path):
    """launch_common.sh's rules: comments and blank lines out; a missing or empty file, a host
    twice refused; and the first host is the master address, so not a name only this machine has."""
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text("# the nodes\n\nnode-1  # rack 3\n  node-2\n")
    assert read_hostfile(str(hostfile)) == ["node-1", "node-2"]
    refusals = {
        "": "lists no host: write one host name or IP per line",
        "# none yet\n": "lists no host",
        "node-1\nnode-2\nnode-1\n": "lists host node-1 twice: list each node once",
        "localhost\nnode-2\n": "starts with localhost, the master address of the launch",
    }
    for text, message in refusals.items():
        hostfile.write_text(text)
        with pytest.raises(UsageError, match=message):
            read_hostfile(str(hostfile))
    with pytest.raises(UsageError, match="does not exist: copy scripts/hosts.txt.example there"):
        read_hostfile(str(tmp_path / "absent.txt"))
    hostfile.write_text("localhost\n")  # this machine alone: fine
    assert read_hostfile(str(hostfile)) == ["localhost"]


def test_clock_skew_counts_only_what_the_round_trip_cannot_explain():
    def skew(remote: float) -> float:
        return clock_skew(Probe("h", facts={"time": remote}, sent_at=100.0, answered_at=101.5))

    assert [skew(100.0), skew(101.5), skew(100.7)] == [0.0, 0.0, 0.0]
    assert [skew(93.0), skew(110.0)] == [7.0, 8.5]
