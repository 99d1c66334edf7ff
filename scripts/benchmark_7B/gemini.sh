#!/usr/bin/env bash
# LLaMA-2 7B, Gemini (ZeRO-3-like, all on GPU), seq 4096, grad checkpointing, flash attention.
# Usage: copy scripts/hosts.txt.example to scripts/benchmark_7B/hosts.txt, list your nodes, then run this script.
set -euo pipefail
HOSTFILE=$(realpath "$(dirname "$0")/hosts.txt")
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=8
colossalai run --nproc_per_node 8 --hostfile "$HOSTFILE" benchmark.py -c llama2-7b -p gemini -g -a -b 16 -l 4096 --results runs/benchmarks.jsonl "$@"
