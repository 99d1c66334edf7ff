"""All-reduce bandwidth across every rank of a launch (gloo on CPU, NCCL on GPUs): one line on rank 0.

colossalai run --nproc_per_node 8 --hostfile hosts.txt scripts/allreduce.py --megabytes 256
torchrun --standalone --nproc_per_node 2 scripts/allreduce.py

scripts/doctor.py launches it as its last check.
"""

import argparse

from llama_recipe.doctor import measure_allreduce
from llama_recipe.errors import OneLineErrorParser


def main() -> None:
    p: argparse.ArgumentParser = OneLineErrorParser(prog="allreduce.py", description=__doc__.splitlines()[0])
    p.add_argument("--megabytes", type=int, default=64, help="the size of the buffer all-reduced")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds the ranks wait for each other")
    args = p.parse_args()
    line = measure_allreduce(args.megabytes, args.timeout)
    if line:
        print(line, flush=True)


if __name__ == "__main__":
    main()
