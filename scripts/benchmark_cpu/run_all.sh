#!/usr/bin/env bash
# The plugin matrix on this kind of machine: 2 CPU processes, `small` preset, fp32, one thread each.
# Results are appended to runs/benchmarks_cpu.jsonl (one JSON line per plugin).
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
RESULTS=${RESULTS:-runs/benchmarks_cpu.jsonl}
mkdir -p "$(dirname "$RESULTS")"
for layout in "-p ddp" "-p zero2" "-p zero2_cpu" "-p hybrid_parallel --tp 2"; do
  echo "== $layout"
  .venv/bin/torchrun --standalone --nproc_per_node 2 benchmark.py -c small -l 256 -b 2 -s 8 -i 2 $layout \
    --results "$RESULTS" "$@"
done
