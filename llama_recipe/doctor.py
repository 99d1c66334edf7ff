"""scripts/doctor.py's checks of a cluster before a launch. Every host of the hostfile answers one
probe (over password-less SSH, as `colossalai run` reaches it; this machine's own hosts without
SSH, as the launcher starts them), and each check reads the probes' answers: SSH, the repository
and venv at this machine's paths, the same package versions, clocks, the save directory (written
to, free disk), the master port; then a short all-reduce across every rank, launched as training
is (`colossalai run` from the repository root), which prints the bandwidth it measured.

Each check returns a Finding: what it saw, or one line naming the problem and the fix, where the
doctor stops (exit 2). The hostfile rules are scripts/launch_common.sh's, so both read a hostfile the
same way; the doctor also refuses a first host that only this machine can reach by its name.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError

REPO = Path(__file__).resolve().parent.parent
FACTS_MARK = "doctor-facts: "  # the probe's answer line (a login shell may print other lines first)
ALLREDUCE_MARK = "all-reduce: "  # scripts/allreduce.py's result line, on rank 0
SSH_CONNECT_TIMEOUT_S = 5


def read_hostfile(path: str) -> list[str]:
    """The hosts of a hostfile in order, blank lines and '#' comments left out; refused (UsageError)
    when it is missing, lists nothing, or lists a host twice (launch_common.sh's rules and words)."""
    if not Path(path).is_file():
        raise UsageError(f"hostfile {path} does not exist: copy scripts/hosts.txt.example there and list your nodes")
    hosts = [line.split("#", 1)[0].strip() for line in Path(path).read_text().splitlines()]
    hosts = [host for host in hosts if host]
    if not hosts:
        raise UsageError(f"hostfile {path} lists no host: write one host name or IP per line")
    for i, host in enumerate(hosts):
        if host in hosts[:i]:
            raise UsageError(f"hostfile {path} lists host {host} twice: list each node once")
    if len(hosts) > 1 and is_local_host(hosts[0]) and hosts[0] != socket.gethostname():
        # colossalai run makes the first host the master address: every other host would dial itself
        raise UsageError(
            f"hostfile {path} starts with {hosts[0]}, the master address of the launch, which the other hosts "
            "cannot reach under that name: put this machine first by a name or IP they reach"
        )
    return hosts


def is_local_host(host: str) -> bool:
    """A host that `colossalai run` starts without SSH (launch_common.sh's is_local_host)."""
    return host in ("localhost", "127.0.0.1", "0.0.0.0", socket.gethostname())


def host_facts(save_dir: str, port: int) -> dict:
    """What the checks need to know about one host. It runs there, with the venv's python: its
    source is sent over SSH, so it imports only the standard library, inside."""
    import importlib.metadata
    import os
    import re
    import shutil
    import socket
    import tempfile
    import time

    versions = {}
    for dist in importlib.metadata.distributions():  # in sys.path order: the first of a name is the one imported
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"] or "").lower()
        versions.setdefault(name, dist.version)
    existing = save_dir  # the directory a run would create its save directory in, if it is not there yet
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    write_error = None
    try:  # really write: root passes every permission check, but not a read-only mount's
        handle, written = tempfile.mkstemp(dir=existing, prefix=".doctor-")
        os.close(handle)
        os.unlink(written)
    except OSError as e:
        write_error = e.strerror or str(e)
    with socket.socket() as s:  # as torch's TCPStore binds the master port: every address, SO_REUSEADDR
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
            port_busy = None
        except OSError as e:
            port_busy = e.strerror or str(e)
    free = shutil.disk_usage(existing).free if os.path.isdir(existing) else 0
    return {
        "time": time.time(),
        "versions": versions,
        "checked_dir": existing,
        "write_error": write_error,
        "free_bytes": free,
        "port_busy": port_busy,
    }


@dataclass
class Probe:
    """One host's answer: the facts, or why there are none (SSH failed, or the paths are missing there)."""

    host: str
    facts: dict | None = None
    ssh_error: str | None = None
    missing: str | None = None  # "repository" or "python": not at this machine's path there
    error: str | None = None  # the probe itself failed there
    sent_at: float = 0.0  # this machine's clock when the probe left, and when its answer was in
    answered_at: float = 0.0


def probe_command(repo: Path, python: str, save_dir: str, port: int) -> tuple[str, str]:
    """The command line a host runs (through `sh`, whatever the login shell) and its stdin: the
    repository and python at this machine's paths, then host_facts with the venv's python."""
    script = (
        f'test -f {shlex.quote(str(repo / "pretrain.py"))} || {{ echo "{FACTS_MARK}"\'{{"missing": "repository"}}\'; exit 0; }}; '
        f'test -x {shlex.quote(python)} || {{ echo "{FACTS_MARK}"\'{{"missing": "python"}}\'; exit 0; }}; '
        f"cd {shlex.quote(str(repo))} && exec {shlex.quote(python)} -"
    )
    source = inspect.getsource(host_facts)
    stdin = f"{source}\nimport json\nprint({FACTS_MARK!r} + json.dumps(host_facts({save_dir!r}, {port})))\n"
    return f"sh -c {shlex.quote(script)}", stdin


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.replace("\r", "").splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


def probe_host(host: str, argv: list[str], stdin: str, timeout: float) -> Probe:
    """Run one probe (`argv`: ssh to the host, or `sh` here) and read its answer."""
    probe = Probe(host=host, sent_at=time.time())
    process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = process.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        err += f"\nno answer within {timeout:g} s"
    probe.answered_at = time.time()
    answer = [line for line in out.splitlines() if line.startswith(FACTS_MARK)]
    if process.returncode == 255 and argv[0] == "ssh":  # ssh's own failure (a remote command's status is passed on)
        probe.ssh_error = _last_line(err)
    elif not answer:
        probe.error = _last_line(err)
    else:
        facts = json.loads(answer[-1][len(FACTS_MARK) :])
        probe.missing, probe.facts = facts.pop("missing", None), facts or None
    return probe


def probe_hosts(hosts: list[str], ssh_port: int | None, save_dir: str, port: int, timeout: float) -> dict[str, Probe]:
    """Every host's probe, all at once (a large cluster answers in about one SSH round trip), by
    host; the key "" is this machine's own, the reference for versions. Local hosts share it."""
    command, stdin = probe_command(REPO, sys.executable, save_dir, port)
    ssh = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_CONNECT_TIMEOUT_S}"]
    ssh += ["-p", str(ssh_port)] if ssh_port else []
    remote = [host for host in hosts if not is_local_host(host)]
    argvs = {"": ["sh", "-c", command], **{host: [*ssh, host, command] for host in remote}}
    with ThreadPoolExecutor(max_workers=min(64, len(argvs))) as pool:
        running = {
            key: pool.submit(probe_host, key or socket.gethostname(), argv, stdin, timeout)
            for key, argv in argvs.items()
        }
        probes = {key: future.result() for key, future in running.items()}
    return {host: probes["" if is_local_host(host) else host] for host in ["", *hosts]}


@dataclass
class Cluster:
    """What scripts/doctor.py checks: the hosts (this machine alone when no hostfile), how they
    are reached, and the launch's settings."""

    hosts: list[str]
    save_dir: str
    ssh_port: int | None = None
    master_port: int = 29500  # colossalai run's default
    nproc_per_node: int = 1
    allreduce_mb: int = 64
    min_free_gb: float = 10.0
    max_clock_skew_s: float = 5.0
    timeout_s: float = 120.0


@dataclass
class Finding:
    """A check's one line: what it saw (ok), or the problem and its fix."""

    ok: bool
    line: str


def _ssh_command(cluster: Cluster, host: str) -> str:
    port = f"-p {cluster.ssh_port} " if cluster.ssh_port else ""
    return f"ssh -o BatchMode=yes {port}{host} true"


def _problem(name: str, problems: list[str], fix: str) -> Finding:
    return Finding(False, f"{name}: {'; '.join(problems)}: {fix}")


def check_ssh(cluster: Cluster, probes: dict[str, Probe]) -> Finding:
    failed = [
        f"host {h} does not answer password-less ssh ({probes[h].ssh_error})"
        for h in cluster.hosts
        if probes[h].ssh_error
    ]
    if failed:
        first = next(h for h in cluster.hosts if probes[h].ssh_error)
        return _problem("ssh", failed, f"every host must accept '{_ssh_command(cluster, first)}' from this one")
    remote = [h for h in cluster.hosts if not is_local_host(h)]
    if not remote:
        return Finding(True, "ssh: not needed (this machine's processes start without it)")
    return Finding(True, f"ssh: {len(remote)} host(s) answer password-less ssh ({', '.join(remote)})")


def check_paths(cluster: Cluster, probes: dict[str, Probe]) -> Finding:
    where = {"repository": REPO / "pretrain.py", "python": sys.executable}
    problems = [f"{h} has no {where[probes[h].missing]}" for h in cluster.hosts if probes[h].missing]
    problems += [f"the check failed on {h} ({probes[h].error})" for h in cluster.hosts if probes[h].error]
    if problems:
        fix = "put the repository and its venv at the same paths on every host (one clone and install, or a shared filesystem)"
        return _problem("paths", problems, fix)
    return Finding(True, f"paths: {REPO} and {sys.executable} on every host")


def check_packages(cluster: Cluster, probes: dict[str, Probe]) -> Finding:
    here = probes[""].facts["versions"]
    problems = []
    for host in cluster.hosts:
        there = probes[host].facts["versions"]
        differ = [
            f"{name} {there.get(name, 'missing')} (here {here.get(name, 'missing')})"
            for name in sorted(set(here) | set(there))
            if here.get(name) != there.get(name)
        ]
        if differ:
            more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
            problems.append(f"{host} has {', '.join(differ[:3])}{more}")
    if problems:
        fix = (
            "install the same versions on every host (the same requirements files, or one venv on a shared filesystem)"
        )
        return _problem("packages", problems, fix)
    return Finding(True, f"packages: the same {len(here)} package versions on every host")


def clock_skew(probe: Probe) -> float:
    """How far the host's clock is outside the time its answer was on the way: 0 when it lies
    between this machine's clock at sending and at receiving."""
    remote = probe.facts["time"]
    return max(0.0, probe.sent_at - remote, remote - probe.answered_at)


def check_clocks(cluster: Cluster, probes: dict[str, Probe]) -> Finding:
    skews = {host: clock_skew(probes[host]) for host in cluster.hosts}
    problems = [
        f"{host}'s clock is {skew:.1f} s off this machine's"
        for host, skew in skews.items()
        if skew > cluster.max_clock_skew_s
    ]
    if problems:
        fix = f"synchronize the clocks (chrony or systemd-timesyncd) to within {cluster.max_clock_skew_s:g} s: logs and checkpoint times are compared across hosts"
        return _problem("clocks", problems, fix)
    return Finding(True, f"clocks: within {max(skews.values()):.1f} s of this machine's")


def check_save_dir(cluster: Cluster, probes: dict[str, Probe]) -> Finding:
    problems, free_gb = [], []
    for host in cluster.hosts:
        facts = probes[host].facts
        free_gb.append(facts["free_bytes"] / 1e9)
        if facts["write_error"]:
            problems.append(f"{host} cannot write to {facts['checked_dir']} ({facts['write_error']})")
        elif free_gb[-1] < cluster.min_free_gb:
            problems.append(
                f"{host} has {free_gb[-1]:.1f} GB free at {facts['checked_dir']}, under --min_free_gb {cluster.min_free_gb:g}"
            )
    if problems:
        fix = "-o must name a writable directory with room for the checkpoints on every host (the same path, or a shared filesystem)"
        return _problem("save_dir", problems, fix)
    return Finding(True, f"save_dir: {cluster.save_dir} writable on every host, {min(free_gb):.0f} GB free or more")


def check_master_port(cluster: Cluster, probes: dict[str, Probe]) -> Finding:
    master = cluster.hosts[0]  # colossalai run's master address: the first host
    busy = probes[master].facts["port_busy"]
    if busy:
        return Finding(
            False,
            f"master port: {cluster.master_port} is in use on {master} ({busy}): stop what holds it, or pick a free port with --master_port here and in colossalai run",
        )
    return Finding(True, f"master port: {cluster.master_port} free on {master}")


def check_launcher(cluster: Cluster, probes: dict[str, Probe]) -> Finding:
    launcher = shutil.which("colossalai")
    if launcher is None:
        return Finding(
            False, "launcher: colossalai is not on PATH: activate the recipe's venv first (source .venv/bin/activate)"
        )
    return Finding(True, f"launcher: {launcher}")


def allreduce_command(cluster: Cluster) -> list[str]:
    """The all-reduce launched as training is: `colossalai run` from the repository root, on the
    hostfile's hosts (none: this machine alone), scripts/allreduce.py on every rank."""
    command = [
        "colossalai",
        "run",
        "--nproc_per_node",
        str(cluster.nproc_per_node),
        "--master_port",
        str(cluster.master_port),
    ]
    if any(not is_local_host(host) for host in cluster.hosts):
        command += ["--host", ",".join(cluster.hosts)]
    command += ["--ssh-port", str(cluster.ssh_port)] if cluster.ssh_port else []
    return [
        *command,
        "scripts/allreduce.py",
        "--megabytes",
        str(cluster.allreduce_mb),
        "--timeout",
        str(cluster.timeout_s),
    ]


def check_allreduce(cluster: Cluster, probes: dict[str, Probe]) -> Finding:
    """Launch the all-reduce and wait at most --timeout seconds: a rendezvous that hangs (a
    firewall, a wrong interface) becomes a failure, and the launcher and its local processes end."""
    # every host's torchrun gives up waiting for its peers then too (torchrun reads PET_<FLAG>; colossalai run
    # exports this environment to every host): otherwise an agent left waiting would hold the master port for 15 min
    env = {"PET_RDZV_CONF": f"timeout={max(1, round(cluster.timeout_s))}", **os.environ}
    job = subprocess.Popen(
        allreduce_command(cluster),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = job.communicate(timeout=cluster.timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        job.communicate()
        fix = "a host the others cannot reach at the master address and port (a firewall, another network interface: NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME), or a longer --timeout"
        return Finding(False, f"all-reduce: no result within {cluster.timeout_s:g} s: {fix}")
    result = [line for line in output.splitlines() if line.startswith(ALLREDUCE_MARK)]
    if job.returncode == 0 and result:
        return Finding(True, result[-1])
    errors = [line for line in output.splitlines() if re.search(r"\w+(Error|Exception): ", line)]
    reason = _last_line(errors[-1] if errors else output)
    return Finding(
        False,
        f"all-reduce: the launch failed (exit code {job.returncode}: {reason}): run `{shlex.join(allreduce_command(cluster))}` from {REPO} to see every rank's output",
    )


def diagnose(cluster: Cluster) -> int:
    """Run the checks in order, one line each (ok on stdout, a problem on stderr); stop at the
    first problem. Returns the exit code: 0 healthy, 2 a problem."""
    probes = probe_hosts(cluster.hosts, cluster.ssh_port, cluster.save_dir, cluster.master_port, cluster.timeout_s)
    checks = (
        check_ssh,
        check_paths,
        check_packages,
        check_clocks,
        check_save_dir,
        check_master_port,
        check_launcher,
        check_allreduce,
    )  # in this order
    for check in checks:
        finding = check(cluster, probes)
        if not finding.ok:
            print(f"error: {finding.line}", file=sys.stderr, flush=True)
            return 2
        print(f"ok: {finding.line}", flush=True)
    return 0


def measure_allreduce(megabytes: int, timeout_s: float, repeats: int = 5) -> str | None:
    """All-reduce `megabytes` of fp32 across every rank of this launch (gloo on CPU, NCCL on GPUs)
    and time it; rank 0 returns its line (bus bandwidth as nccl-tests counts it: 2(n-1)/n of the
    buffer crosses each rank's link), the other ranks None. The sum is checked, so a result means the
    ranks really exchanged the data."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    world, backend = dist.get_world_size(), dist.get_backend()
    buffer = torch.ones(megabytes * 2**20 // 4, device="cuda" if cuda else "cpu")
    dist.all_reduce(buffer)  # a first one, not timed: connections and NCCL's rings are set up here
    if not bool((buffer == world).all()):
        raise RuntimeError(f"the all-reduce of ones across {world} ranks did not give {world} everywhere")
    seconds = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(buffer)
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    rank = dist.get_rank()
    dist.destroy_process_group()
    if rank != 0:
        return None
    median = sorted(seconds)[len(seconds) // 2]
    bus = megabytes * 2**20 * 2 * (world - 1) / world / median / 1e9
    return f"{ALLREDUCE_MARK}{megabytes} MB across {world} ranks ({backend}): {median * 1e3:.1f} ms, {bus:.2f} GB/s bus bandwidth"
