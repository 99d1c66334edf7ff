#!/usr/bin/env bash
# LLaMA-2 7B, ZeRO-2 with optimizer states offloaded to CPU.
# Usage: copy scripts/hosts.txt.example to scripts/benchmark_7B/hosts.txt, list your nodes, then run this script
# (HOSTFILE=FILE names another hostfile; see scripts/launch_common.sh).
set -euo pipefail
# shellcheck source=scripts/launch_common.sh
source "$(dirname "$0")/../launch_common.sh"
launch_on_hosts "$(dirname "$0")/hosts.txt" 8 benchmark.py -c llama2-7b -p zero2_cpu -g -a -b 8 -l 4096 --optimizer hybrid_adam --results runs/benchmarks.jsonl "$@"
