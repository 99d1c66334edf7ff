"""Check a cluster before a launch: one line per check, exit 2 at the first problem.

python scripts/doctor.py --hostfile hosts.txt -o checkpoint                  # every host of hosts.txt
python scripts/doctor.py -o checkpoint                                       # this machine alone
SSH_PORT=2222 python scripts/doctor.py --hostfile hosts.txt -o /shared/ckpt --nproc_per_node 8

Checks, in order: every host answers password-less SSH; has the repository and this venv at this
machine's paths, and the same package versions; its clock is within a few seconds of this one's;
can write to -o and has room there; the master port is free on the first host; then a short
all-reduce across every rank, launched as training is (`colossalai run`, gloo on CPU, NCCL on
GPUs), prints the bandwidth it measured. Run it from the repository root, in the venv.
"""

import argparse
import os
import sys
from pathlib import Path

from llama_recipe.doctor import Cluster, diagnose, read_hostfile
from llama_recipe.errors import EXIT_USAGE, OneLineErrorParser, UsageError


def main() -> None:
    p: argparse.ArgumentParser = OneLineErrorParser(prog="doctor.py", description=__doc__.splitlines()[0])
    p.add_argument("--hostfile", help="the hosts, one per line, as colossalai run takes them (default: this machine)")
    p.add_argument("-o", "--save_dir", required=True, help="the checkpoint directory the run will write (-o)")
    ssh_port = os.environ.get("SSH_PORT")
    p.add_argument(
        "--ssh-port",
        type=int,
        default=int(ssh_port) if ssh_port else None,
        help="the hosts' sshd port (default: $SSH_PORT, else ssh's)",
    )
    p.add_argument("--master_port", type=int, default=Cluster.master_port, help="the port the launch will use")
    p.add_argument(
        "--nproc_per_node",
        type=int,
        default=None,
        help="processes per host in the all-reduce (8: every GPU of a node; default 1, 2 on this machine alone)",
    )
    p.add_argument("--allreduce_mb", type=int, default=Cluster.allreduce_mb, help="megabytes all-reduced")
    p.add_argument(
        "--min_free_gb", type=float, default=Cluster.min_free_gb, help="free disk wanted at -o on every host"
    )
    p.add_argument(
        "--max_clock_skew",
        type=float,
        default=Cluster.max_clock_skew_s,
        help="seconds a host's clock may be off this machine's",
    )
    p.add_argument(
        "--timeout", type=float, default=Cluster.timeout_s, help="seconds the probes and the all-reduce may take"
    )
    args = p.parse_args()
    try:
        hosts = read_hostfile(args.hostfile) if args.hostfile else ["localhost"]
    except UsageError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(EXIT_USAGE)
    cluster = Cluster(
        hosts=hosts,
        save_dir=str(Path(args.save_dir).resolve()),  # where a run launched from here writes, on every host
        ssh_port=args.ssh_port,
        master_port=args.master_port,
        nproc_per_node=args.nproc_per_node or (1 if args.hostfile else 2),  # 1 rank alone exchanges nothing
        allreduce_mb=args.allreduce_mb,
        min_free_gb=args.min_free_gb,
        max_clock_skew_s=args.max_clock_skew,
        timeout_s=args.timeout,
    )
    sys.exit(diagnose(cluster))


if __name__ == "__main__":
    main()
