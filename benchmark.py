"""Measure training throughput, MFU and memory of a booster plugin on synthetic tokens.

torchrun --standalone --nproc_per_node 2 benchmark.py -c small -p zero2 -l 256 -b 2 --max_steps 8 --ignore_steps 2
colossalai run --nproc_per_node 8 --hostfile hosts.txt benchmark.py -c llama2-7b -p gemini -g -a -b 16

The flags are pretrain.py's (the same parser), and its own: --ignore_steps (steps left out of the timing) and
--results. Of the ColossalAI benchmark's spellings it keeps --num_steps (= --max_steps), --mbs and --zero; its
-s, -i, -w and --warmup_ratio mean other flags in pretrain.py and finetune.py, so here they are spelled
--max_steps, --ignore_steps and --gemini_warmup_ratio.
"""

import statistics

import torch

from llama_recipe.cli import run_script
from llama_recipe.config import TrainConfig
from llama_recipe.distributed import is_main_process
from llama_recipe.files import append_json_line
from llama_recipe.memory import state_memory
from llama_recipe.metrics import MFU_FORMULA, model_flops_utilization
from llama_recipe.recipes import pretrain

PARTS = ("data", "forward_backward", "optimizer", "other")


def report(summary: dict, cfg: TrainConfig, memory: dict | None = None) -> dict:
    """The benchmark's figures from a run's summary (and --memory_accounting's bytes per parameter):
    printed, and appended to --results as one JSON line."""
    ignore = cfg.logging.ignore_steps
    timed = slice(ignore, None) if len(summary["step_seconds"]) > ignore else slice(None)
    seconds = summary["step_seconds"][timed]
    median = statistics.median(seconds)
    tokens_per_s = summary["step_tokens"][-1] / median  # synthetic batches: every step has the same tokens
    world, peak, flops = summary["world_size"], summary["peak_flops"], summary["flops_per_token"]
    seq_len = summary["seq_len"]
    mfu = model_flops_utilization(tokens_per_s, flops, world, peak)  # None where the peak is unknown
    mfu_full = model_flops_utilization(tokens_per_s, summary["flops_per_token_full_attention"], world, peak)
    # Where a step's time goes, summed over the timed steps (the split the trainer measures).
    parts = {k: sum(p[k] for p in summary["step_parts"][timed]) for k in PARTS}
    outside = (parts["data"] + parts["other"]) / sum(seconds)
    par = cfg.parallel
    row = dict(
        plugin=par.plugin,
        config=cfg.model.config,
        world_size=world,
        dp_size=summary["dp_size"],
        tp=par.tp,
        pp=par.pp,
        precision=summary["precision"],
        optimizer=summary["optimizer"],
        batch_size=cfg.training.batch_size,
        seq_len=seq_len,
        tokens_per_s=tokens_per_s,
        tgs=tokens_per_s / world,
        samples_per_s=tokens_per_s / seq_len,
        step_s_median=median,
        step_s_spread=max(seconds) - min(seconds),
        tflops_per_device=tokens_per_s * flops / world / 1e12,
        mfu=mfu,  # causal attention halved (MFU_FORMULA)
        mfu_full_attention=mfu_full,  # attention counted whole, as PaLM, nanoGPT and torchtitan count
        flops_convention=MFU_FORMULA,
        peak_tflops=peak / 1e12 if peak else None,
        peak_source=summary["peak_source"],
        peak_memory_mb=summary["peak_memory_mb"],
        step_parts_s={k: v / len(seconds) for k, v in parts.items()},
        outside_model_fraction=outside,
        losses=summary["losses"],
        compile_seconds=summary["compile_seconds"],
        **({"memory": memory, "zero_stage": par.zero_stage} if memory else {}),
    )
    split = ", ".join(f"{k.replace('_', '+')} {v:.3f}s" for k, v in row["step_parts_s"].items())
    utilization = (
        f"MFU {100 * mfu:.1f}% (attention counted whole: {100 * mfu_full:.1f}%) of {row['peak_tflops']:.3f} TFLOP/s"
        if peak
        else "MFU: none"
    )
    print(
        f"\n{par.plugin} {cfg.model.config} x{world} ({row['precision']}), {cfg.training.batch_size}x{seq_len} "
        f"per replica, {len(seconds)} timed steps\n"
        f"  tokens/s {tokens_per_s:,.0f}   per device (TGS) {row['tgs']:,.0f}   samples/s {row['samples_per_s']:.2f}\n"
        f"  step {median:.3f}s median (spread {row['step_s_spread']:.3f}s)   peak memory {row['peak_memory_mb']:,.0f} MB\n"
        f"  per step: {split}; outside forward/backward/optimizer {100 * outside:.1f}%\n"
        f"  model TFLOP/s per device {row['tflops_per_device']:.3f}   {utilization} ({row['peak_source']})\n"
        f"  FLOPs: {MFU_FORMULA}"
    )
    if memory:
        report_memory(memory, cfg)
    if cfg.logging.results:
        append_json_line(cfg.logging.results, row)
    return row


def benchmark(cfg: TrainConfig) -> dict:
    summary = pretrain(cfg)
    memory = state_memory(cfg) if cfg.logging.memory_accounting else None
    if is_main_process():
        report(summary, cfg, memory)
    return summary


def report_memory(memory: dict, cfg: TrainConfig) -> None:
    """Rank 0's bytes per parameter by role, next to Megatron's table (where it has the precision)."""
    parts = ", ".join(f"{role} {value:.2f}" for role, value in memory["bytes_per_parameter"].items())
    megatron = ""
    if memory["megatron_distributed_optimizer"] is not None:
        megatron = (
            f"; Megatron: {memory['megatron_without_distributed_optimizer']} without its distributed "
            f"optimizer, {memory['megatron_distributed_optimizer']:.2f} with it"
        )
    print(
        f"  state per parameter on rank 0 (zero_stage {cfg.parallel.zero_stage}, dp {memory['dp_size']}): {parts} = "
        f"{memory['total_bytes_per_parameter']:.2f} bytes{megatron}"
    )


if __name__ == "__main__":
    torch.backends.cuda.matmul.allow_tf32 = True
    run_script("benchmark", benchmark)
