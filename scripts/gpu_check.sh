#!/usr/bin/env bash
# The checks a CPU cannot do, in one command on a CUDA machine; appends a dated report to
# docs/gpu-validation.md. Set it up first (see requirements-gpu.txt):
#   pip install -r requirements-gpu.txt && pip install --no-deps -r requirements-colossalai.txt
#   pip install flash-attn --no-build-isolation
# Then:  bash scripts/gpu_check.sh          (NGPU=8 bash scripts/gpu_check.sh on a multi-GPU node)
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
NGPU=${NGPU:-$($PYTHON -c "import torch; print(max(1, torch.cuda.device_count()))")}
REPORT=${REPORT:-docs/gpu-validation.md}
RESULTS=$(mktemp -d)/benchmarks.jsonl
TORCHRUN="$PYTHON -m torch.distributed.run --standalone --nproc_per_node $NGPU"

section() { printf '\n### %s\n\n```\n' "$1" >>"$REPORT"; }
endsection() { printf '```\n' >>"$REPORT"; }
results_table() {  # benchmark.py --results lines -> one table in the report
  $PYTHON - "$1" >>"$REPORT" <<'PY'
import json, sys
print(f"{'config':8} {'plugin':16} {'precision':10} {'optimizer':14} {'tok/s/GPU':>10} {'MFU':>6} {'TFLOP/s':>8} {'peak MB':>9}")
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"{r['config']:8} {r['plugin']:16} {r['precision']:10} {r['optimizer']:14} {r['tgs']:>10,.0f} "
          f"{100 * r['mfu']:>5.1f}% {r['tflops_per_device']:>8.1f} {r['peak_memory_mb']:>9,.0f}")
PY
}

{
  printf '\n## %s on %s\n\n' "$(date -u +%Y-%m-%d)" "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) x$NGPU"
  $PYTHON - <<'PY'
import importlib.metadata as m
for p in ["torch", "colossalai", "transformers", "flash-attn", "datasets"]:
    try:
        print(f"- {p} {m.version(p)}")
    except m.PackageNotFoundError:
        print(f"- {p}: not installed")
PY
} >>"$REPORT"

section "GPU-gated tests: Gemini train/save/resume, flash-attn varlen vs SDPA (pytest -m gpu)"
$PYTHON -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tail -15 >>"$REPORT"
endsection

section "attn.py -a: kernel in use and parity with eager attention"
$PYTHON attn.py -a 2>&1 | tail -3 >>"$REPORT"
endsection

section "HybridAdam vs torch.optim.AdamW after 5 steps (max abs weight difference)"
$PYTHON - >>"$REPORT" 2>&1 <<'PY'
import torch
from colossalai.nn.optimizer import HybridAdam
torch.manual_seed(0)
a = torch.nn.Linear(512, 512).cuda(); b = torch.nn.Linear(512, 512).cuda(); b.load_state_dict(a.state_dict())
oa = torch.optim.AdamW(a.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
ob = HybridAdam(b.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, adamw_mode=True)
for _ in range(5):
    x = torch.randn(64, 512, device="cuda")
    for m, o in ((a, oa), (b, ob)):
        o.zero_grad(); m(x).pow(2).mean().backward(); o.step()
print(max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters())))
PY
endsection

section "benchmark.py, bf16, flash attention (tokens/s per GPU, MFU, peak memory)"
for config in small 1b; do
  for plugin in gemini gemini_auto zero2 zero2_cpu ddp; do
    $TORCHRUN benchmark.py -c "$config" -p "$plugin" -x bf16 -a -l 2048 -b 4 -s 12 -i 3 --results "$RESULTS" \
      >/dev/null 2>&1 || echo "$config $plugin: FAILED" >>"$REPORT"
  done
  if [ "$NGPU" -ge 2 ]; then
    $TORCHRUN benchmark.py -c "$config" -p hybrid_parallel --tp 2 -x bf16 -a -l 2048 -b 4 -s 12 -i 3 \
      --results "$RESULTS" >/dev/null 2>&1 || echo "$config hybrid_parallel: FAILED" >>"$REPORT"
  fi
done
results_table "$RESULTS"
endsection
section "Collage on GPU: pure bf16 throughput and memory vs fp32-master bf16 AdamW (zero2, 1b)"
RESULTS_COLLAGE=$(mktemp -d)/collage.jsonl
for variant in "-x bf16 --optimizer adamw" "-x pure_bf16 --optimizer adamw" "--optimizer collage_light" "--optimizer collage_plus"; do
  # shellcheck disable=SC2086
  $TORCHRUN benchmark.py -c 1b -p zero2 $variant -a -l 2048 -b 4 -s 12 -i 3 --results "$RESULTS_COLLAGE" \
    >/dev/null 2>&1 || echo "collage $variant: FAILED" >>"$REPORT"
done
results_table "$RESULTS_COLLAGE"
endsection

section "1b, zero2, bf16: default (chunked loss), --unfused_loss, --compile (rows in that order); async checkpoint stall"
RESULTS_SPEED=$(mktemp -d)/speed.jsonl
for variant in "" "--unfused_loss" "--compile"; do
  # shellcheck disable=SC2086
  $TORCHRUN benchmark.py -c 1b -p zero2 -x bf16 -a -l 2048 -b 4 -s 12 -i 3 $variant --results "$RESULTS_SPEED" \
    >/dev/null 2>&1 || echo "1b zero2 $variant: FAILED" >>"$REPORT"
done
results_table "$RESULTS_SPEED"
$PYTHON -c "import json, sys; print('compile seconds:', [json.loads(l)['compile_seconds'] for l in open(sys.argv[1])])" \
  "$RESULTS_SPEED" >>"$REPORT"
$TORCHRUN scripts/benchmark_checkpoint.py -c small -p zero2 --repeats 3 2>/dev/null | tail -2 >>"$REPORT"
endsection

section "Collage vs fp32 AdamW loss curves, small model, beta2 0.999 (scripts/compare_collage.py)"
$PYTHON scripts/compare_collage.py -c small -l 512 -b 8 --steps 400 --jobs 1 -o runs/collage-gpu 2>&1 | tail -8 >>"$REPORT"
endsection
echo "appended to $REPORT"
