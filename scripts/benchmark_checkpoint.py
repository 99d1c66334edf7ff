"""Time a sharded booster checkpoint against a plain torch.save of the same state, side by side.

    torchrun --standalone --nproc_per_node 1 scripts/benchmark_checkpoint.py -c small -p zero2

The checkpoint (model, optimizer, scheduler, data position, RNG, running states) is saved through
the booster exactly as training saves it; the baseline is every rank's `torch.save` of the model
and optimizer state dicts it holds, to the same disk. Both are repeated, interleaved, and the
medians compared. With one process both write exactly the same state. The same checkpoint is also
saved as --async_save does: the stall (until training could go on) and the whole write are timed.
"""

import argparse
import shutil
import statistics
import time
from pathlib import Path

import torch

from llama_recipe.checkpoint import save_checkpoint, start_background_save
from llama_recipe.config import TrainConfig
from llama_recipe.data import SyntheticBatches
from llama_recipe.distributed import barrier, device, is_main_process, launch, rank
from llama_recipe.model import build_model, get_model_config
from llama_recipe.optim import build_lr_scheduler, build_optimizer
from llama_recipe.parallel import build_parallelism


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-c", "--config", default="small")
    p.add_argument("-p", "--plugin", default="zero2", choices=["ddp", "zero2", "zero2_cpu"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dir", default="runs/checkpoint-benchmark", help="where to write (removed afterwards)")
    args = p.parse_args()
    cfg = TrainConfig.for_script("pretrain", config=args.config, plugin=args.plugin)

    launch(seed=0)
    par = build_parallelism(cfg)
    model_config = get_model_config(cfg.model.config)
    model = build_model(model_config)
    optimizer = build_optimizer("adamw", model, 1e-4, 0.1)
    scheduler = build_lr_scheduler(optimizer, 0, 10)
    model, optimizer, scheduler = par.boost(model, optimizer, scheduler)
    batch = {k: v.to(device()) for k, v in SyntheticBatches(model_config.vocab_size, 128, 2, 0).next_batch().items()}
    par.booster.backward(model(**batch).loss, optimizer)  # one step, so the optimizer has its state
    optimizer.step()
    optimizer.zero_grad()

    root = Path(args.dir)
    booster_s, plain_s, stall_s, background_s = [], [], [], []
    for i in range(args.repeats):  # interleaved, so both see the same machine noise
        states = dict(step=i + 1, epoch=0, consumed_samples=0, consumed_tokens=0, layout={}, config=cfg.to_dict())
        _, seconds, size = save_checkpoint(par, model, optimizer, scheduler, str(root / "booster"), states, {"n": 0})
        booster_s.append(seconds)
        barrier()
        started = time.perf_counter()
        pending = start_background_save(par, model, optimizer, scheduler, str(root / "async"), states, {"n": 0})
        stall_s.append(time.perf_counter() - started)
        pending.wait()
        background_s.append(time.perf_counter() - started)
        barrier()
        started = time.perf_counter()
        plain = root / f"plain-rank{rank()}.pt"
        torch.save({"model": model.unwrap().state_dict(), "optimizer": optimizer.unwrap().state_dict()}, plain)
        barrier()  # the slowest rank decides, as for the booster's save
        plain_s.append(time.perf_counter() - started)
        plain_size = plain.stat().st_size
    if is_main_process():
        b, t = statistics.median(booster_s), statistics.median(plain_s)
        print(
            f"{args.plugin} {args.config} x{torch.distributed.get_world_size()}, {args.repeats} repeats: booster checkpoint {b:.3f}s ({size / 2**20:.1f} MB), "
            f"torch.save {t:.3f}s ({plain_size / 2**20:.1f} MB per rank); ratio {b / t:.2f}x"
        )
        stall, whole = statistics.median(stall_s), statistics.median(background_s)
        print(
            f"  --async_save: training stalls {stall:.3f}s ({stall / b:.0%} of the synchronous save), "
            f"the background write completes after {whole:.3f}s"
        )
    barrier()
    if is_main_process():
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
