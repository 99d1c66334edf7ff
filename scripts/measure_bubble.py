"""Measure the pipeline bubble: the share of each stage's step spent outside its own forward and
backward compute (waiting for the neighbouring stage, and the sends themselves), 1f1b vs interleaved.

torchrun --standalone --nproc_per_node 2 scripts/measure_bubble.py              # small, pp2, 8 micro-batches
torchrun --standalone --nproc_per_node 2 scripts/measure_bubble.py --steps 6 -b 16

Each schedule trains through pretrain.py's own code (parser, checks, plugin, loop) on the shipped sample.
On the plugin's schedule object of that run (not its class) the script times every call of
`forward_step`, `backward_step` and `forward_backward_step` (one pipeline step), and leaves the first step
out (warm-up). Idle share of a stage = 1 - (forward + backward time) / step time. Megatron's formula for
the bubble, ((p - 1) / v) / (m + (p - 1) / v) with p stages, m micro-batches and v model chunks, is
printed beside it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch.distributed as dist

from llama_recipe import recipes
from llama_recipe.cli import parse_args, quiet_libraries
from llama_recipe.config import SHIPPED_PRETRAIN_DATA
from llama_recipe.distributed import launch, world_size
from llama_recipe.validation import validate

SCHEDULES = {
    "1f1b": [],
    "interleaved": ["--pp_style", "interleaved", "--num_model_chunks", "2"],
    # the last stage also holds the 32,000-word output layer and the loss: give it fewer decoder layers
    "1f1b, layers 6,2": ["--num_layers_per_stage", "6,2"],
}


def timed_schedule(par, clock: dict) -> None:
    """Wrap this run's schedule methods with clocks: busy seconds per pipeline step, and the step's."""
    scheduler = par.plugin.scheduler
    for name in ("forward_step", "backward_step"):
        original = getattr(scheduler, name)

        def busy(*args, _original=original, **kwargs):
            started = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                clock["busy_now"] += time.perf_counter() - started

        setattr(scheduler, name, busy)
    whole = scheduler.forward_backward_step

    def step(*args, **kwargs):
        clock["busy_now"], started = 0.0, time.perf_counter()
        out = whole(*args, **kwargs)
        clock["steps"].append((time.perf_counter() - started, clock["busy_now"]))
        return out

    scheduler.forward_backward_step = step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-c", "--config", default="small")
    p.add_argument("-l", "--max_length", type=int, default=256)
    p.add_argument("-b", "--batch_size", type=int, default=8, help="micro-batches of 1 per step")
    p.add_argument("--steps", type=int, default=4)
    args = p.parse_args()
    quiet_libraries()
    launch(seed=0)
    build = recipes.build_parallelism
    clock: dict = defaultdict(list)

    def build_and_time(cfg):
        par = build(cfg)
        timed_schedule(par, clock)
        return par

    recipes.build_parallelism = build_and_time
    pp = world_size()
    rows = []
    for name, extra in SCHEDULES.items():
        clock.clear()
        clock["busy_now"] = 0.0
        flags = ["-c", args.config, "-p", "hybrid_parallel", "--pp", str(pp), "-d", str(SHIPPED_PRETRAIN_DATA),
                 "-l", str(args.max_length), "-b", str(args.batch_size), "--microbatch_size", "1",
                 "--max_steps", str(args.steps), "-s", "0", "-x", "fp32", "-o", "", "-t", "", *extra]  # fmt: skip
        cfg = parse_args("pretrain", flags)  # (-o '': no checkpoint, -t '': no TensorBoard)
        validate(cfg, world_size())
        recipes.pretrain(cfg)
        timed = clock["steps"][1:]  # the first step allocates and warms up
        idle = 1 - sum(b for _, b in timed) / sum(t for t, _ in timed)
        shares = [None] * pp
        dist.all_gather_object(shares, (idle, statistics.median(t for t, _ in timed)))
        chunks = 2 if "interleaved" in extra else 1
        formula = ((pp - 1) / chunks) / (args.batch_size + (pp - 1) / chunks)
        rows.append((name, shares, formula))
    if dist.get_rank() == 0:
        print(f"\n{args.config}, pp{pp}, {args.batch_size} micro-batches of 1 x {args.max_length} tokens, "
              f"{args.steps - 1} timed steps")  # fmt: skip
        print("| schedule | idle share per stage (measured) | mean | Megatron's formula | median step |")
        print("|---|---|---:|---:|---:|")
        for name, shares, formula in rows:
            per_stage = ", ".join(f"{100 * s:.1f}%" for s, _ in shares)
            mean = sum(s for s, _ in shares) / pp
            print(f"| {name} | {per_stage} | {100 * mean:.1f}% | {100 * formula:.1f}% | {shares[0][1]:.2f} s |")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
