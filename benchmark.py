"""Measure training throughput, MFU and memory of a booster plugin on synthetic tokens.

torchrun --standalone --nproc_per_node 2 benchmark.py -c small -p zero2 -l 256 -b 2 -s 8 -i 2
colossalai run --nproc_per_node 8 --hostfile hosts.txt benchmark.py -c llama2-7b -p gemini -g -a -b 16
"""

import json
import os
import statistics

import torch

from llama_recipe.cli import run_script
from llama_recipe.config import PRECISIONS, OneLineErrorParser, TrainConfig
from llama_recipe.metrics import MFU_FORMULA, model_flops_utilization
from llama_recipe.model import get_model_config
from llama_recipe.optim import OPTIMIZER_NAMES
from llama_recipe.plugins import BASELINE, PLUGIN_NAMES
from llama_recipe.trainer import pretrain


def parse_args():
    p = OneLineErrorParser(prog="benchmark.py", description=__doc__.splitlines()[0])
    p.add_argument("-c", "--config", default="small", help="model preset or HF config.json")
    p.add_argument("-p", "--plugin", default="zero2", choices=[*PLUGIN_NAMES, BASELINE], help="'none': plain PyTorch")
    p.add_argument("-b", "--batch_size", type=int, default=2, help="sequences per data-parallel rank")
    p.add_argument("-s", "--num_steps", type=int, default=8)
    p.add_argument("-i", "--ignore_steps", type=int, default=2, help="warm-up steps left out of the timing")
    p.add_argument("-g", "--grad_checkpoint", action="store_true")
    p.add_argument("-l", "--max_length", type=int, default=None)
    p.add_argument("-x", "--mixed_precision", choices=PRECISIONS, default=None)
    p.add_argument("-a", "--flash_attention", "--xformers", action="store_true")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--mbs", "--microbatch_size", dest="microbatch_size", type=int, default=1)
    p.add_argument("--zero", "--zero_stage", dest="zero_stage", type=int, default=0)
    p.add_argument("--optimizer", default=None, choices=OPTIMIZER_NAMES)
    p.add_argument("--shard_param_frac", type=float, default=1.0, help="gemini: fraction of parameters sharded")
    p.add_argument("--offload_optim_frac", type=float, default=0.0, help="gemini: optimizer states kept on CPU")
    p.add_argument("--offload_param_frac", type=float, default=0.0, help="gemini: parameters kept on CPU")
    p.add_argument("-w", "--warmup_ratio", type=float, default=0.8, help="gemini_auto: non-model data warm-up ratio")
    p.add_argument("--peak_tflops", type=float, default=None, help="peak TFLOP/s per device (default: table or probe)")
    p.add_argument("--results", default=None, help="append one JSON line per run to this file")
    args = p.parse_args()
    cfg = TrainConfig(
        config=args.config, plugin=args.plugin, batch_size=args.batch_size, max_steps=args.num_steps,
        grad_checkpoint=args.grad_checkpoint, max_length=args.max_length, mixed_precision=args.mixed_precision,
        flash_attention=args.flash_attention, tp=args.tp, pp=args.pp, microbatch_size=args.microbatch_size,
        zero_stage=args.zero_stage, optimizer=args.optimizer, dataset="synthetic", warmup_steps=0,
        shard_param_frac=args.shard_param_frac, offload_optim_frac=args.offload_optim_frac,
        offload_param_frac=args.offload_param_frac, gemini_warmup_ratio=args.warmup_ratio,
        save_dir="", tensorboard_dir=None, log_interval=1, time_breakdown=True,
    )  # fmt: skip
    return cfg, args


def report(summary: dict, cfg: TrainConfig, args) -> None:
    timed = slice(args.ignore_steps, None) if len(summary["step_seconds"]) > args.ignore_steps else slice(None)
    seconds = summary["step_seconds"][timed]
    median = statistics.median(seconds)
    tokens_per_s = summary["step_tokens"][-1] / median  # synthetic batches: every step has the same tokens
    world = summary["world_size"]
    seq_len = cfg.max_length or get_model_config(cfg.config).max_position_embeddings
    if args.peak_tflops:
        peak, peak_source = args.peak_tflops * 1e12, "--peak_tflops"
    else:
        peak, peak_source = summary["peak_flops"], summary["peak_source"]
    mfu = model_flops_utilization(tokens_per_s, summary["flops_per_token"], world, peak)
    # Where a step's time goes, summed over the timed steps (the same split the trainer measures).
    parts = {
        k: sum(p[k] for p in summary["step_parts"][timed]) for k in ("data", "forward_backward", "optimizer", "other")
    }
    outside = (parts["data"] + parts["other"]) / sum(seconds)
    row = dict(
        plugin=cfg.plugin, config=cfg.config, world_size=world, dp_size=summary["dp_size"], tp=cfg.tp, pp=cfg.pp,
        precision=summary["precision"], optimizer=summary["optimizer"], batch_size=cfg.batch_size, seq_len=seq_len,
        tokens_per_s=tokens_per_s, tgs=tokens_per_s / world, samples_per_s=tokens_per_s / seq_len,
        step_s_median=median, step_s_spread=max(seconds) - min(seconds),
        tflops_per_device=tokens_per_s * summary["flops_per_token"] / world / 1e12, mfu=mfu,
        peak_tflops=peak / 1e12, peak_source=peak_source, peak_memory_mb=summary["peak_memory_mb"],
        step_parts_s={k: v / len(seconds) for k, v in parts.items()}, outside_model_fraction=outside,
        losses=summary["losses"],
    )  # fmt: skip
    split = ", ".join(f"{k.replace('_', '+')} {v:.3f}s" for k, v in row["step_parts_s"].items())
    print(
        f"\n{cfg.plugin} {cfg.config} x{world} ({row['precision']}), {cfg.batch_size}x{seq_len} per replica, "
        f"{len(seconds)} timed steps\n"
        f"  tokens/s {tokens_per_s:,.0f}   per device (TGS) {row['tgs']:,.0f}   samples/s {row['samples_per_s']:.2f}\n"
        f"  step {median:.3f}s median (spread {row['step_s_spread']:.3f}s)   peak memory {row['peak_memory_mb']:,.0f} MB\n"
        f"  per step: {split}; outside forward/backward/optimizer {100 * outside:.1f}%\n"
        f"  model TFLOP/s per device {row['tflops_per_device']:.3f}   MFU {100 * mfu:.1f}% "
        f"of {row['peak_tflops']:.3f} TFLOP/s ({peak_source})\n"
        f"  FLOPs: {MFU_FORMULA}"
    )
    if args.results:
        with open(args.results, "a") as f:
            f.write(json.dumps(row) + "\n")


def main(cfg: TrainConfig) -> dict:
    summary = pretrain(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        report(summary, cfg, ARGS)
    return summary


if __name__ == "__main__":
    torch.backends.cuda.matmul.allow_tf32 = True
    CFG, ARGS = parse_args()
    run_script(main, CFG)
