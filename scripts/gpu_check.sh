#!/usr/bin/env bash
# The checks a CPU cannot do, in one command on a CUDA machine; appends a dated report to
# docs/gpu-validation.md. Set it up first (see requirements-gpu.txt):
#   pip install -r requirements-gpu.txt && pip install --no-deps -r requirements-colossalai.txt
#   pip install flash-attn --no-build-isolation
# or, on a node without internet that has its own CUDA torch, from a wheelhouse built elsewhere with
# scripts/gpu_wheelhouse.sh (installed with --no-index into --target, first on PYTHONPATH).
# Then:  bash scripts/gpu_check.sh          (NGPU=8 bash scripts/gpu_check.sh on a multi-GPU node)
#   --quick                 Gemini/gemini_auto train-save-resume, flash parity, HybridAdam, bf16 throughput
#                           of small and 1b under zero2 and gemini: an estimated 5-7 minutes on one GPU
#   --wheelhouse DIR        install DIR's wheels first (pip --no-index --no-deps) into --target DIR
#   --target DIR            where (default .gpu-site in the repository); --install-only: install, check, stop
set -uo pipefail
PYTHON=${PYTHON:-python3}
QUICK=0 WHEELHOUSE="" TARGET="" INSTALL_ONLY=0
absolute() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }  # paths given are the caller's
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --wheelhouse) WHEELHOUSE=$(absolute "${2:?--wheelhouse needs a directory}"); shift ;;
    --target) TARGET=$(absolute "${2:?--target needs a directory}"); shift ;;
    --install-only) INSTALL_ONLY=1 ;;
    *) echo "error: unknown option $1 (--quick, --wheelhouse DIR, --target DIR, --install-only)" >&2; exit 2 ;;
  esac
  shift
done
cd "$(dirname "$0")/.." || exit 2
TARGET=${TARGET:-$PWD/.gpu-site}
refuse() { echo "error: $1" >&2; exit 2; }

if [ -n "$WHEELHOUSE" ]; then  # the node's own torch, everything else from the wheelhouse
  [ -f "$WHEELHOUSE/wheelhouse.txt" ] || refuse "$WHEELHOUSE is not a wheelhouse: build one with scripts/gpu_wheelhouse.sh"
  node_torch=$($PYTHON -c "import torch; print(torch.__version__, torch.version.cuda or '')" 2>/dev/null) ||
    refuse "$PYTHON has no torch: the wheelhouse brings everything but torch; use the node's Python (PYTHON=...)"
  [ "$INSTALL_ONLY" = 1 ] || [ -n "${node_torch#* }" ] ||
    refuse "this node's torch ${node_torch% *} is built without CUDA: gpu_check.sh needs a CUDA torch"
  [ ! -e "$TARGET" ] || [ -f "$TARGET/.from-wheelhouse" ] || [ -z "$(ls -A "$TARGET")" ] ||
    refuse "--target $TARGET exists and is not an earlier install from a wheelhouse: name a new directory"
  rm -rf "$TARGET"  # a fresh install each time: nothing left over from another wheelhouse
  $PYTHON -m pip install --quiet --no-index --no-deps --no-compile --find-links "$WHEELHOUSE" --target "$TARGET" \
    "$WHEELHOUSE"/*.whl || refuse "installing $WHEELHOUSE into $TARGET failed (above)"
  cp "$WHEELHOUSE/wheelhouse.txt" "$TARGET/.from-wheelhouse"
  site=$(cd "$TARGET" && pwd)  # first on the path: its transformers 4.51.3 wins over a node's own
  PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"
  export PYTHONPATH PATH
  imports=$($PYTHON -W ignore -c "import llama_recipe.colossalai_patches as p; p.apply_patches(False); import colossalai.booster.plugin, colossalai.nn.optimizer, llama_recipe.cli, llama_recipe.server" 2>&1) ||
    { echo "$imports" >&2; refuse "the recipe does not import with $WHEELHOUSE (above): rebuild it for this node's Python and freeze"; }
  echo "installed $(find "$WHEELHOUSE" -maxdepth 1 -name '*.whl' | wc -l) wheels into $TARGET next to torch $node_torch;" \
    "PYTHONPATH=$PYTHONPATH"
  # what the wheelhouse left to the node must still fit (a freeze of another node, or an old one, may not)
  UNMET=$($PYTHON scripts/wheelhouse.py --check-install "$site")
  [ -z "$UNMET" ] || printf 'warning: requirement not met: %s\n' "${UNMET//$'\n'/$'\nwarning: requirement not met: '}"
  [ "$INSTALL_ONLY" = 1 ] && exit 0
fi
$PYTHON -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null ||
  refuse "$PYTHON's torch sees no CUDA device: gpu_check.sh runs on a GPU node"

NGPU=${NGPU:-$($PYTHON -c "import torch; print(max(1, torch.cuda.device_count()))")}
REPORT=${REPORT:-docs/gpu-validation.md}
RESULTS=$(mktemp -d)/benchmarks.jsonl
TORCHRUN="$PYTHON -m torch.distributed.run --standalone --nproc_per_node $NGPU"

section() { printf '\n### %s\n\n```\n' "$1" >>"$REPORT"; SECTION_START=$SECONDS; }
endsection() { printf '```\n(%d s)\n' $((SECONDS - SECTION_START)) >>"$REPORT"; }
results_table() {  # benchmark.py --results lines -> one table in the report
  $PYTHON - "$1" >>"$REPORT" <<'PY'
import json, sys
print(f"{'config':8} {'plugin':16} {'precision':10} {'optimizer':14} {'tok/s/GPU':>10} {'MFU':>6} {'TFLOP/s':>8} {'peak MB':>9}")
for line in open(sys.argv[1]):
    r = json.loads(line)
    mfu = r.get("mfu")  # none on a device the peak table does not name (a MIG slice, a new GPU)
    mfu = f"{100 * mfu:>5.1f}%" if isinstance(mfu, float) and mfu == mfu else "   n/a"
    print(f"{r['config']:8} {r['plugin']:16} {r['precision']:10} {r['optimizer']:14} {r['tgs']:>10,.0f} "
          f"{mfu} {r['tflops_per_device']:>8.1f} {r['peak_memory_mb']:>9,.0f}")
PY
}

header() {
  printf '\n## %s on %s%s\n\n' "$(date -u +%Y-%m-%d)" \
    "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) x$NGPU" "$([ "$QUICK" = 1 ] && echo ' (--quick)')"
  $PYTHON - <<'PY'
import importlib.metadata as m
for p in ["torch", "colossalai", "transformers", "flash-attn", "datasets"]:
    try:
        print(f"- {p} {m.version(p)}")
    except m.PackageNotFoundError:
        print(f"- {p}: not installed")
PY
  [ -n "$WHEELHOUSE" ] && echo "- installed from a wheelhouse (scripts/gpu_wheelhouse.sh) next to the node's torch"
  [ -n "${UNMET:-}" ] && printf -- '- requirement not met: %s\n' "${UNMET//$'\n'/$'\n- requirement not met: '}"
}

gpu_tests() {  # gpu_tests PATH...: the GPU-gated tests under these paths
  section "GPU-gated tests: Gemini train/save/resume, flash-attn varlen vs SDPA (pytest -m gpu)"
  $PYTHON -m pytest -m gpu -q -p no:cacheprovider "$@" 2>&1 | tail -15 >>"$REPORT"
  endsection
}

attention_parity() {
  section "attn.py -a: kernel in use and parity with eager attention"
  if [ "$QUICK" = 1 ] && ! $PYTHON -c "import flash_attn" 2>/dev/null; then
    echo "flash-attn is not installed: SDPA/flash parity not checked" >>"$REPORT"
  else
    $PYTHON attn.py -a 2>&1 | tail -3 >>"$REPORT"
  fi
  endsection
}

hybrid_adam() {  # first use JIT-compiles ColossalAI's CPU Adam and fused CUDA optimizer (cached in ~/.cache/colossalai)
  section "HybridAdam vs torch.optim.AdamW after 5 steps (max abs weight difference; the time includes the kernels' first build)"
  $PYTHON -W ignore - >>"$REPORT" 2>&1 <<'PY'  # -W: ColossalAI's import-time notes
import torch
from llama_recipe.colossalai_patches import apply_patches
apply_patches(cpu_only=False)  # as every script of the recipe does first (ColossalAI without bitsandbytes, ...)
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
}

throughput() {  # throughput "PLUGINS" STEPS WARMUP: small and 1b under each plugin
  section "benchmark.py, bf16, flash attention (tokens/s per GPU, MFU, peak memory)"
  for config in small 1b; do
    for plugin in $1; do
      $TORCHRUN benchmark.py -c "$config" -p "$plugin" -x bf16 -a -l 2048 -b 4 --max_steps "$2" --ignore_steps "$3" --results "$RESULTS" \
        >/dev/null 2>&1 || echo "$config $plugin: FAILED" >>"$REPORT"
    done
    if [ "$QUICK" = 0 ] && [ "$NGPU" -ge 2 ]; then
      $TORCHRUN benchmark.py -c "$config" -p hybrid_parallel --tp 2 -x bf16 -a -l 2048 -b 4 --max_steps 12 --ignore_steps 3 \
        --results "$RESULTS" >/dev/null 2>&1 || echo "$config hybrid_parallel: FAILED" >>"$REPORT"
    fi
  done
  results_table "$RESULTS"
  endsection
}

header >>"$REPORT"
if [ "$QUICK" = 1 ]; then  # an estimated 5-7 minutes on one GPU (docs/gpu-validation.md has the budget)
  hybrid_adam  # first: builds the kernels Gemini's default optimizer uses too
  # only the files with GPU tests (no test-only packages needed), only our pytest plugin (not the node's)
  PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 gpu_tests -p pytest_timeout tests/test_gemini.py tests/test_attention.py
  attention_parity
  throughput "zero2 gemini" 6 2
  echo "appended to $REPORT"
  exit 0
fi
gpu_tests tests
attention_parity
hybrid_adam
throughput "gemini gemini_auto zero2 zero2_cpu ddp" 12 3
section "Collage on GPU: pure bf16 throughput and memory vs fp32-master bf16 AdamW (zero2, 1b)"
RESULTS_COLLAGE=$(mktemp -d)/collage.jsonl
for variant in "-x bf16 --optimizer adamw" "-x pure_bf16 --optimizer adamw" "--optimizer collage_light" "--optimizer collage_plus"; do
  # shellcheck disable=SC2086
  $TORCHRUN benchmark.py -c 1b -p zero2 $variant -a -l 2048 -b 4 --max_steps 12 --ignore_steps 3 --results "$RESULTS_COLLAGE" \
    >/dev/null 2>&1 || echo "collage $variant: FAILED" >>"$REPORT"
done
results_table "$RESULTS_COLLAGE"
endsection

section "1b, zero2, bf16: default (chunked loss), --unfused_loss, --compile (rows in that order); async checkpoint stall"
RESULTS_SPEED=$(mktemp -d)/speed.jsonl
for variant in "" "--unfused_loss" "--compile"; do
  # shellcheck disable=SC2086
  $TORCHRUN benchmark.py -c 1b -p zero2 -x bf16 -a -l 2048 -b 4 --max_steps 12 --ignore_steps 3 $variant --results "$RESULTS_SPEED" \
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
