"""Which layouts fit: predicted peak memory per device by role, and step time, for a model on N devices.

python scripts/plan.py -c llama2-70b --gpus 64 --gpu_memory 80 -l 4096
python scripts/plan.py -c llama2-7b --gpus 8 --gpu_memory 80 -l 4096 -b 64 -p hybrid_parallel --json

-c -p -l -b -x --tp --pp --recompute --optimizer are pretrain.py's flags (-b: the global batch, in
sequences; -p, --tp, --pp, --recompute fix what is otherwise searched). The model behind the numbers:
llama_recipe/planner.py; how to read them and how they were calibrated: docs/planning.md.
"""

import argparse
import json
import sys
from dataclasses import asdict

from llama_recipe.cli import add_config_flags
from llama_recipe.errors import EXIT_USAGE, UsageError
from llama_recipe.model import get_model_config
from llama_recipe.planner import ROLES, Hardware, Shape, plan
from llama_recipe.plugins import PLUGIN_NAMES, PLUGINS

SEARCHED = {
    "plugin": {"default": None},
    "tp": {"default": None},
    "pp": {"default": None},
    "recompute": {"default": None},
}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_flags(
        p,
        {
            "config": {},
            "max_length": {"default": 4096},
            "batch_size": {"default": None},
            "mixed_precision": {"default": "bf16"},
            "optimizer": {"default": "adamw"},
            **SEARCHED,
        },
    )
    p.add_argument("--gpus", type=int, required=True, help="devices in all")
    p.add_argument("--gpu_memory", type=float, required=True, help="GB of memory per device")
    for name, value in asdict(Hardware()).items():
        p.add_argument(f"--{name}", type=type(value), default=value, help=f"step-time model (default {value})")
    p.add_argument("--top", type=int, default=10, help="rows to print")
    p.add_argument("--json", action="store_true", help="print the fitting layouts as JSON")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.gpus < 1 or args.gpu_memory <= 0:
        raise UsageError("--gpus must be at least 1 and --gpu_memory above 0")
    hw = Hardware(**{name: getattr(args, name) for name in asdict(Hardware())})
    shape = Shape.of(get_model_config(args.config))
    batch = args.batch_size or args.gpus  # a sequence per device unless -b says
    plugins = [args.plugin] if args.plugin else [n for n in PLUGIN_NAMES if PLUGINS[n].planned]
    fixed = dict(tp=args.tp, pp=args.pp, recompute=args.recompute)
    rows = plan(
        shape,
        args.gpus,
        args.gpu_memory,
        args.max_length,
        batch,
        plugins,
        args.mixed_precision,
        args.optimizer,
        hw,
        **fixed,
    )
    if args.json:
        print(json.dumps([as_row(r) for r in rows], indent=1))
        return 0
    print(
        f"{args.config} on {args.gpus} x {args.gpu_memory:g} GB, {batch} x {args.max_length} tokens per step, "
        f"{args.mixed_precision}, {args.optimizer}; {len(rows)} layouts fit; step time at {hw.mfu:.0%} MFU of "
        f"{hw.peak_tflops:g} TFLOP/s, {hw.intra_node_gbps:g}/{hw.inter_node_gbps:g} GB/s in/between nodes"
    )
    print(table(rows[: args.top]))
    return 0


def as_row(prediction: dict) -> dict:
    return {
        **{k: v for k, v in prediction.items() if k != "layout"},
        "layout": {**asdict(prediction["layout"]), "dp": prediction["layout"].dp},
    }


def table(rows: list[dict]) -> str:
    head = ["layout", "microbatches", *ROLES, "peak GB", "step s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        gb = [f"{r['bytes'][role] / 1e9:.1f}" for role in ROLES]
        lines.append(
            f"| {r['layout'].describe()} | {r['microbatches']} | {' | '.join(gb)} | {r['peak_gb']:.1f} | "
            f"{r['step_s']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
