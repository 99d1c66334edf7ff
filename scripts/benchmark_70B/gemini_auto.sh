#!/usr/bin/env bash
# LLaMA-2 70B, Gemini with automatic CPU/GPU placement.
# Usage: copy scripts/hosts.txt.example to scripts/benchmark_70B/hosts.txt, list your nodes, then run this script
# (HOSTFILE=FILE names another hostfile; see scripts/launch_common.sh).
set -euo pipefail
# shellcheck source=scripts/launch_common.sh
source "$(dirname "$0")/../launch_common.sh"
launch_on_hosts "$(dirname "$0")/hosts.txt" 8 benchmark.py -c llama2-70b -p gemini_auto -g -a -b 2 -l 4096 --results runs/benchmarks.jsonl "$@"
