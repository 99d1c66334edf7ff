#!/usr/bin/env bash
# LLaMA-2 70B, 3D: tp 4 x pp 2 x ZeRO-1 data parallel (the reference's 3d.sh, which never ran).
# Usage: copy scripts/hosts.txt.example to scripts/benchmark_70B/hosts.txt, list your nodes, then run this script
# (HOSTFILE=FILE names another hostfile; see scripts/launch_common.sh).
set -euo pipefail
# shellcheck source=scripts/launch_common.sh
source "$(dirname "$0")/../launch_common.sh"
launch_on_hosts "$(dirname "$0")/hosts.txt" 8 benchmark.py -c llama2-70b -p hybrid_parallel --tp 4 --pp 2 --zero 1 --mbs 1 -g -a -b 8 -l 4096 --results runs/benchmarks.jsonl "$@"
