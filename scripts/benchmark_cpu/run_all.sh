#!/usr/bin/env bash
# The plugin matrix on this kind of machine: 2 CPU processes x 1 thread, `small` preset, fp32, the
# same synthetic batches, and plain PyTorch (-p none) as the baseline. Appends one JSON line per run
# to $RESULTS and draws runs/benchmarks_cpu.png.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
RESULTS=${RESULTS:-runs/benchmarks_cpu.jsonl}
mkdir -p "$(dirname "$RESULTS")"
for layout in "-p none" "-p ddp" "-p zero2" "-p zero2_cpu" "-p hybrid_parallel --tp 2 -b 4"; do
  echo "== $layout"
  # shellcheck disable=SC2086
  .venv/bin/torchrun --standalone --nproc_per_node 2 benchmark.py -c small -l 256 -b 2 --max_steps 8 --ignore_steps 2 $layout \
    --results "$RESULTS" "$@" | tail -6
done
.venv/bin/python scripts/plot_benchmarks.py "$RESULTS" -o runs/benchmarks_cpu.png
