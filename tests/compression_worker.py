"""Run under torchrun (2 processes) by test_compression.py: one launch that checks PowerSGD's
arithmetic over a real 2-rank gloo group, then trains `tiny` with -p ddp --grad_compression powersgd
(a checkpoint at step 3), then resumes from step 3 in the same processes (a fresh model, DDP and
hook, as a new launch would build them); trains under -p hybrid_parallel too (pp = 1: data parallel
through torch DDP). Writes OUT/rank<R>.json with what it measured.

usage: compression_worker.py OUT_DIR            (2 processes)
       compression_worker.py OUT_DIR pipeline   (4 processes: pp 2 x dp 2, --compress_stages 1 and
                                                 --compress_backprop; then its epilogue-only form)
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from conftest import TINY_RUN

import llama_recipe.recipes as recipes
from llama_recipe.cli import parse_args
from llama_recipe.compression import CompressionSettings, PowerSGD
from llama_recipe.distributed import launch
from llama_recipe.validation import validate

STEPS, SAVE_AT = 5, 3
WIDTH = 16


def replica_gradients(shapes, rank_of_each, seed, replica):
    """Replica `replica`'s gradients: matrices of the given ranks (a product of two factors), from a
    seed, so every process can rebuild every replica's gradients without communicating."""
    g = torch.Generator().manual_seed(seed * 100 + replica)
    out = []
    for shape, r in zip(shapes, rank_of_each, strict=True):
        if r:  # a product of two factors: rank r
            out.append(torch.randn(shape[0], r, generator=g) @ torch.randn(r, shape[1], generator=g))
        else:
            out.append(torch.randn(shape, generator=g))
    return out


def compressor(names, rank, error_feedback=True):
    return PowerSGD(CompressionSettings(rank, 0, error_feedback, seed=7, log_cosine=True), dict(enumerate(names)))


def exact_allreduce_check(world, me):
    """Matrices of rank 1 on each replica (rank <= 2 summed), a vector: PowerSGD with rank 2 and 4
    must give the exact mean; rank 1 must not (so the check can fail)."""
    shapes, ranks = [(48, 40), (64, 32), (40,)], [1, 1, 0]
    exact = [
        sum(ts) / world for ts in zip(*[replica_gradients(shapes, ranks, 1, w) for w in range(world)], strict=True)
    ]
    errors, cosines = {}, {}
    for rank in (1, 2, 4):
        mine = replica_gradients(shapes, ranks, 1, me)
        comp = compressor(["a", "b", "v"], rank)
        comp.sync(list(zip(["a", "b", "v"], mine, strict=True)))
        errors[rank] = max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(mine, exact, strict=True))
        cosines[rank] = comp.take().cosine  # --powersgd_log_cosine's diagnostic on the same sync
    return errors, cosines


def error_feedback_check(world, me, error_feedback):
    """Full-rank gradients compressed at rank 2 over 6 steps: sum of what was applied plus the mean
    residual must equal the sum of the exact mean gradients (error feedback loses nothing)."""
    names, shapes, ranks = ["a", "b"], [(32, 24), (24, 16)], [16, 16]
    comp = compressor(names, 2, error_feedback)
    applied = [torch.zeros(s) for s in shapes]
    exact = [torch.zeros(s) for s in shapes]
    for step in range(6):
        mine = replica_gradients(shapes, ranks, 10 + step, me)
        for total, ts in zip(
            exact,
            zip(*[replica_gradients(shapes, ranks, 10 + step, w) for w in range(world)], strict=True),
            strict=True,
        ):
            total += sum(ts) / world
        comp.sync(list(zip(names, mine, strict=True)))
        for total, g in zip(applied, mine, strict=True):
            total += g
    residual = [comp.errors.get(n, torch.zeros(s)).clone() for n, s in zip(names, shapes, strict=True)]
    for r in residual:
        dist.all_reduce(r)
        r /= world
    gap = max(float((a + r - e).abs().max() / e.abs().max()) for a, r, e in zip(applied, residual, exact, strict=True))
    without_residual = max(float((a - e).abs().max() / e.abs().max()) for a, e in zip(applied, exact, strict=True))
    return {"with_residual": gap, "applied_only": without_residual}


class DeclaredOutOfOrder(torch.nn.Module):
    """Two same-shaped layers declared in the opposite order to their use: a fresh DDP's buckets
    (reverse declaration order) differ from the ones it rebuilds after its first iteration
    (gradient-ready order), so bucket 0 holds another parameter before and after the rebuild."""

    def __init__(self):
        super().__init__()
        self.second = torch.nn.Linear(WIDTH, WIDTH, bias=False)
        self.first = torch.nn.Linear(WIDTH, WIDTH, bias=False)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


def _one_bucket_at_a_time(state, bucket):
    """torch's powerSGD_hook, each bucket finished before the next starts: its chained futures issue
    all-reduces from gloo's callback threads, which interleave differently on the two ranks (a hang)."""
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import powerSGD_hook

    future = powerSGD_hook(state, bucket)
    future.wait()
    return future


def _ddp_losses(kind, weights, hook_state, steps, me, first_step=0):
    """Train a fresh DDP (one parameter per bucket) from `weights` and compression state for `steps`;
    returns (losses, weights, state) at the end."""
    import pickle

    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_powersgd
    from torch.nn.parallel import DistributedDataParallel

    model = DeclaredOutOfOrder()
    model.load_state_dict(weights)
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.0005)
    if kind == "torch":  # torch's hook, its state pickled and restored as its docs say
        state = pickle.loads(hook_state) if hook_state else torch_powersgd.PowerSGDState(None, 2, 2)
        state.process_group = dist.group.WORLD
        ddp.register_comm_hook(state, _one_bucket_at_a_time)
    else:
        names = {p.data_ptr(): n for n, p in model.named_parameters()}
        state = PowerSGD(CompressionSettings(2, 2, True, seed=7), names)
        if hook_state:
            state.load_state_dict(hook_state)
        ddp.register_comm_hook(None, state.hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for step in range(first_step, first_step + steps):
        g = torch.Generator().manual_seed(1000 * step + me)  # each rank's own batch of each step
        x, y = torch.randn(8, WIDTH, generator=g), torch.randn(8, WIDTH, generator=g)
        loss = ((ddp(x) - y) ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    saved = pickle.dumps(state) if kind == "torch" else state.state_dict()
    return losses, {k: v.clone() for k, v in model.state_dict().items()}, saved


def bucket_order_check(me):
    """6 steps uninterrupted vs 3 + a fresh DDP resumed for 3, with torch's hook and with ours."""
    torch.manual_seed(0)
    start = DeclaredOutOfOrder().state_dict()
    result = {}
    for kind in ("torch", "ours"):
        full, _, _ = _ddp_losses(kind, start, None, 6, me)
        first, weights, state = _ddp_losses(kind, start, None, 3, me)
        try:
            resumed, _, _ = _ddp_losses(kind, weights, state, 3, me, first_step=3)
        except RuntimeError as e:  # torch's: a buffer of the rebuilt layout added to one of the initial layout
            resumed = [str(e).splitlines()[-1][-160:]]
        result[kind] = {"uninterrupted": full, "resumed": first + resumed}
    return result


def train_and_resume(out: Path, plugin: list[str], name: str, resume: bool = True, steps: int = STEPS) -> list[dict]:
    """`tiny` compressed for STEPS steps (a checkpoint at SAVE_AT), then (with `resume`) resumed from
    SAVE_AT: the runs' summaries. TensorBoard in OUT/tb_<name> and OUT/tb_<name>_resumed."""
    common = [*TINY_RUN, *plugin, "--grad_compression", "powersgd", "--powersgd_warmup", "0",
              "--max_steps", str(steps), "-o", str(out / f"ckpt_{name}")]  # fmt: skip
    launches = [["-i", str(SAVE_AT), "-t", str(out / f"tb_{name}")]]
    if resume:
        launches.append(["-i", "0", "-t", str(out / f"tb_{name}_resumed"), "-f", f"{out}/ckpt_{name}/step-{SAVE_AT}"])
    runs = []
    for extra in launches:
        cfg = parse_args("pretrain", [*common, *extra])
        validate(cfg, dist.get_world_size())
        runs.append(recipes.pretrain(cfg))
    return runs


def pipeline_main(out: Path) -> None:
    """4 processes: hybrid_parallel pp = 2 x dp = 2 with --compress_stages 1 and --compress_backprop 4,
    trained and resumed; then 2 steps with --compress_backprop_epilogue_only; each rank's byte
    counters and pipeline stage."""
    launch(seed=42)
    recipes.launch = lambda *args: None
    layouts = []
    build = recipes.build_parallelism
    recipes.build_parallelism = lambda cfg: layouts.append(build(cfg)) or layouts[-1]  # to read the stage
    plugin = ["-p", "hybrid_parallel", "--pp", "2", "--compress_stages", "1", "--compress_backprop", "4"]
    result = dict(zip(("train", "resumed"), train_and_resume(out, plugin, "pipeline"), strict=True))
    epilogue = [*plugin, "--compress_backprop_epilogue_only"]
    result["epilogue"] = train_and_resume(out, epilogue, "pipeline_epilogue", resume=False, steps=2)[0]
    result["stage"] = int(layouts[0].plugin.stage_manager.stage)  # (a numpy integer)
    (out / f"pipeline-rank{dist.get_rank()}.json").write_text(json.dumps(result, default=str))
    dist.barrier()
    dist.destroy_process_group()


def main(out: Path) -> None:
    launch(seed=42)
    world, me = dist.get_world_size(), dist.get_rank()
    result = dict(zip(("exact", "cosine"), exact_allreduce_check(world, me), strict=True))
    result["error_feedback"] = error_feedback_check(world, me, True)
    result["no_error_feedback"] = error_feedback_check(world, me, False)
    result["bucket_order"] = bucket_order_check(me)
    recipes.launch = lambda *args: None  # the process group exists: the runs below share it
    result["train"], result["resumed"] = train_and_resume(out, ["-p", "ddp", "--powersgd_log_cosine"], "ddp")
    # hybrid_parallel with pp = 1 wraps torch DDP too: the same hook (its resume is ddp's code path)
    result["hybrid"] = train_and_resume(out, ["-p", "hybrid_parallel"], "hybrid", resume=False)[0]
    (out / f"rank{me}.json").write_text(json.dumps(result, default=str))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    (pipeline_main if sys.argv[2:] == ["pipeline"] else main)(Path(sys.argv[1]))
