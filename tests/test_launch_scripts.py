"""The cluster launch scripts (scripts/benchmark_7B/*.sh, scripts/benchmark_70B/*.sh) fail when the
launch cannot happen: a missing hostfile, a host that does not answer SSH, no `colossalai` on PATH are
one line and exit 2 before anything starts (`colossalai run` itself exits 0 for a missing hostfile).
Real bash processes, real ssh on loopback only; each refusal takes milliseconds."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import REPO, script_env

from llama_recipe.distributed import free_port

pytestmark = pytest.mark.multiprocess  # (bash and ssh processes, no training)
LAUNCH_SCRIPTS = sorted(REPO.glob("scripts/benchmark_*/*.sh"))
CLUSTER_SCRIPTS = [s for s in LAUNCH_SCRIPTS if "hosts.txt" in s.read_text()]  # the ones that take a hostfile


def _run(script: Path, hostfile: Path, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    env = {**script_env(HOSTFILE=str(hostfile)), **env}  # (script_env puts the venv first on PATH)
    return subprocess.run(["bash", str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def test_every_cluster_launch_goes_through_the_checked_launcher():
    """No script calls `colossalai run` itself: each one gets the checks of scripts/launch_common.sh."""
    assert len(CLUSTER_SCRIPTS) == 9
    for script in LAUNCH_SCRIPTS:
        assert "colossalai run" not in script.read_text(), script


def test_launch_scripts_refuse_missing_or_unreachable_hosts_in_one_line(tmp_path):
    port = free_port()  # nothing listens there: 127.0.0.2 refuses the connection at once
    unreachable = {"127.0.0.2": f"port {port}: Connection refused", "no-such-host.invalid": "Could not resolve"}
    absent = tmp_path / "hosts.txt"
    expected = f"error: hostfile {absent} does not exist: copy scripts/hosts.txt.example there and list your nodes"
    for script in CLUSTER_SCRIPTS:
        missing = _run(script, absent, tmp_path)
        assert missing.returncode == 2, (script, missing.stdout, missing.stderr)
        assert missing.stderr == f"{expected} (or name one with HOSTFILE=...)\n" and missing.stdout == ""
    for host, reason in unreachable.items():  # after a comment line and a local host, which need no SSH
        hostfile = tmp_path / f"hosts-{host}.txt"
        hostfile.write_text(f"# the nodes\nlocalhost\n\n{host}\n")
        run = _run(CLUSTER_SCRIPTS[0], hostfile, tmp_path, SSH_PORT=str(port))
        assert run.returncode == 2 and run.stdout == "", (run.stdout, run.stderr)
        (line,) = run.stderr.splitlines()
        assert line.startswith(f"error: host {host} in hostfile {hostfile} does not answer password-less ssh"), line
        assert reason in line and f"'ssh -o BatchMode=yes -p {port} {host} true'" in line, line


def test_launch_scripts_refuse_a_repeated_host_and_a_missing_launcher(tmp_path):
    twice = tmp_path / "twice.txt"
    twice.write_text("localhost\nlocalhost\n")
    run = _run(CLUSTER_SCRIPTS[0], twice, tmp_path)
    assert (run.returncode, run.stderr) == (
        2,
        f"error: hostfile {twice} lists host localhost twice: list each node once\n",
    )
    local = tmp_path / "local.txt"
    local.write_text("localhost\n")  # a healthy host (no SSH needed), but no venv on PATH
    run = _run(CLUSTER_SCRIPTS[0], local, tmp_path, PATH="/usr/bin:/bin")
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert (
        run.stderr == "error: colossalai is not on PATH: activate the recipe's venv first (source .venv/bin/activate)\n"
    )
