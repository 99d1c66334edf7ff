"""Build and boost the model exactly as training does, take one optimizer step (so the optimizer
states exist) and one more forward/backward (so the gradients exist too), then count the bytes of
every tensor reachable from the boosted model and optimizer, by dtype.

In-process (test_collage_training.py calls `measure`), or for several ranks under torchrun:
    memory_probe.py OUT_DIR PRETRAIN_FLAGS... [-- PRETRAIN_FLAGS...]
which measures each layout in turn, in one job, and writes OUT_DIR/<case>-rank-<R>.json. A case that
starts with --activations is measured by `activation_peak` instead (docs/planning.md's table), and
`memory_probe.py --table OUT_DIR...` prints those next to the planner's predictions.
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from llama_recipe.cli import parse_args
from llama_recipe.data import SyntheticBatches
from llama_recipe.distributed import launch
from llama_recipe.memory import bytes_by_role
from llama_recipe.metrics import tensor_bytes_by_dtype
from llama_recipe.model import count_parameters, get_model_config
from llama_recipe.parallel import build_parallelism
from llama_recipe.trainer import build_boosted, forward_backward


def _build(argv: list[str]):
    """pretrain.py's model and optimizer for `argv`, boosted, after one step (the optimizer state exists),
    and random batches of its shape: (par, model_config, model, optimizer, one forward/backward)."""
    cfg = parse_args("pretrain", argv)
    par = build_parallelism(cfg)
    model_config = get_model_config(cfg.model.config)
    model, optimizer, _ = build_boosted(cfg, par, model_config, "sdpa", warmup_steps=0, total_steps=10)
    batches = SyntheticBatches(
        model_config.vocab_size, cfg.data.max_length, cfg.training.batch_size, seed=cfg.training.seed + par.dp_rank
    )

    def pass_once():
        forward_backward(par, model, optimizer, batches, 1, inputs=lambda batch: batch)

    pass_once()
    par.step(optimizer)
    optimizer.zero_grad()
    return par, model_config, model, optimizer, pass_once


def measure(argv: list[str]) -> dict:
    """Needs a process group. `argv`: pretrain.py's flags."""
    _, model_config, model, optimizer, pass_once = _build(argv)
    pass_once()
    return dict(
        rank=dist.get_rank(),
        parameters=count_parameters(model_config),
        bytes=tensor_bytes_by_dtype(model, optimizer),
        roles=bytes_by_role(model, optimizer),  # what the planner predicts (llama_recipe/planner.py)
        world_size=dist.get_world_size(),
        param_dtypes=sorted({str(p.dtype) for p in model.parameters()}),
    )


def allocation_peak(run) -> int:
    """The highest the bytes allocated rose above their level at the start while `run()` ran: the
    profiler's allocation record, summed in order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    # every allocation (+bytes) and free (-bytes) the allocator reported, in time order
    records = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    level = peak = 0
    for _, nbytes in records:
        level += nbytes
        peak = max(peak, level)
    return peak


def activation_peak(argv: list[str]) -> dict:
    """The activation peak of one training forward/backward (after a step and a forward/backward, so the
    gradients, DDP's buckets and the optimizer state already exist): what the planner's `activation_bytes` predicts. Needs a process group."""
    par, _, _, _, pass_once = _build(argv)  # (the optimizer state exists from here)
    # once more without zero_grad: DDP rebuilds its gradient buckets in this second forward, and the gradients (state,
    # in the planner's count) exist before the measured pass, as from a step's second micro-batch on (most plugins
    # free them in zero_grad; DDP keeps its buckets)
    pass_once()
    peak = allocation_peak(pass_once)
    stage = int(par.plugin.stage_manager.stage) if par.pipeline else 0
    return dict(rank=dist.get_rank(), activation_peak=peak, stage=stage)


def predicted_table(out_dirs: list[str]) -> str:
    """Measured activation peaks (memory_probe.py --activations) next to planner.activation_bytes, per rank."""
    from llama_recipe.planner import Layout, Shape, activation_bytes

    lines = ["| case | stage | measured MiB | predicted MiB | difference |", "|---|---:|---:|---:|---:|"]
    reports = [json.loads(f.read_text()) for d in out_dirs for f in sorted(Path(d).glob("*.json"))]
    for r in sorted(reports, key=lambda r: (r["argv"], r["rank"])):
        cfg = parse_args("pretrain", r["argv"])
        layout, microbatches = Layout.of(cfg, r["world_size"])
        shape = Shape.of(get_model_config(cfg.model.config))
        predicted = activation_bytes(shape, layout, cfg.data.max_length, microbatches, r["stage"])
        measured = r["activation_peak"]
        lines.append(
            f"| {' '.join(r['argv'])} | {r['stage']} | {measured / 2**20:,.1f} | {predicted / 2**20:,.1f} | "
            f"{predicted / measured - 1:+.1%} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1] == "--table":
        print(predicted_table(sys.argv[2:]))
        sys.exit(0)
    out, cases = Path(sys.argv[1]), " ".join(sys.argv[2:]).split(" -- ")
    launch(seed=42)
    for index, case in enumerate(cases):
        argv = case.split()
        activations = argv[0] == "--activations"
        report = activation_peak(argv[1:]) if activations else measure(argv)
        report.update(argv=argv[1:] if activations else argv, world_size=dist.get_world_size())
        (out / f"{index}-rank-{dist.get_rank()}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()
