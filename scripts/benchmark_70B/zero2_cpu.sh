#!/usr/bin/env bash
# LLaMA-2 70B, ZeRO-2 with CPU-offloaded optimizer.
# Usage: copy scripts/hosts.txt.example to scripts/benchmark_70B/hosts.txt, list your nodes, then run this script.
set -euo pipefail
HOSTFILE=$(realpath "$(dirname "$0")/hosts.txt")
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=8
colossalai run --nproc_per_node 8 --hostfile "$HOSTFILE" benchmark.py -c llama2-70b -p zero2_cpu -g -a -b 1 -l 4096 --optimizer hybrid_adam --results runs/benchmarks.jsonl "$@"
