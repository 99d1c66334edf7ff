#!/usr/bin/env bash
# LLaMA-2 7B, Gemini (ZeRO-3-like, all on GPU), seq 4096, grad checkpointing, flash attention.
# Usage: copy scripts/hosts.txt.example to scripts/benchmark_7B/hosts.txt, list your nodes, then run this script
# (HOSTFILE=FILE names another hostfile; see scripts/launch_common.sh).
set -euo pipefail
# shellcheck source=scripts/launch_common.sh
source "$(dirname "$0")/../launch_common.sh"
launch_on_hosts "$(dirname "$0")/hosts.txt" 8 benchmark.py -c llama2-7b -p gemini -g -a -b 16 -l 4096 --results runs/benchmarks.jsonl "$@"
