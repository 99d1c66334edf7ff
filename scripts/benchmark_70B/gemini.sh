#!/usr/bin/env bash
# LLaMA-2 70B, Gemini.
# Usage: copy scripts/hosts.txt.example to scripts/benchmark_70B/hosts.txt, list your nodes, then run this script.
set -euo pipefail
HOSTFILE=$(realpath "$(dirname "$0")/hosts.txt")
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=8
colossalai run --nproc_per_node 8 --hostfile "$HOSTFILE" benchmark.py -c llama2-70b -p gemini -g -a -b 2 -l 4096 --results runs/benchmarks.jsonl "$@"
