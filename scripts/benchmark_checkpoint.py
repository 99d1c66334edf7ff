"""Time a sharded booster checkpoint against a plain torch.save of the same state, side by side.

    torchrun --standalone --nproc_per_node 2 scripts/benchmark_checkpoint.py -c small -p zero2

The checkpoint (model, optimizer, scheduler, data position, RNG, running states) is saved through
the booster exactly as training saves it; the baseline is every rank's `torch.save` of the model
and optimizer state dicts it holds, to the same disk. Both are repeated, interleaved, and the
medians compared. With one process both write exactly the same state.

The same checkpoint is also saved as --async_save does, followed by what training does next: one
forward and backward (-l x -b tokens per rank), then the wait before the optimizer step may change
the weights (`before_update`). The stall is the time the loop could not train: handing the
checkpoint to the writer plus that wait. The same forward and backward is timed without a save
beside it, so the cost of sharing the machine with the writer shows too.
"""

import argparse
import shutil
import statistics
import time
from pathlib import Path

import torch

from llama_recipe.background_save import start_background_save
from llama_recipe.checkpoint_io import save_checkpoint
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
    p.add_argument("-l", "--seq_len", type=int, default=512, help="tokens per row of the step after a save")
    p.add_argument("-b", "--batch_size", type=int, default=2, help="rows per rank of the step after a save")
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
    batches = SyntheticBatches(model_config.vocab_size, args.seq_len, args.batch_size, 0)

    def forward_backward() -> float:
        started = time.perf_counter()
        batch = {k: v.to(device()) for k, v in batches.next_batch().items()}
        par.booster.backward(model(**batch).loss, optimizer)
        return time.perf_counter() - started

    forward_backward()  # one step, so the optimizer has its state
    optimizer.step()
    optimizer.zero_grad()

    root = Path(args.dir)
    times = {k: [] for k in ("booster", "plain", "handed", "waited", "step_alone", "step_beside", "written")}
    for i in range(args.repeats):  # interleaved, so all see the same machine noise
        states = dict(step=i + 1, epoch=0, consumed_samples=0, consumed_tokens=0, layout={}, config=cfg.to_dict())
        _, seconds, size = save_checkpoint(par, model, optimizer, scheduler, str(root / "booster"), states, {"n": 0})
        times["booster"].append(seconds)
        barrier()
        times["step_alone"].append(forward_backward())
        optimizer.zero_grad()
        barrier()
        started = time.perf_counter()
        pending = start_background_save(par, model, optimizer, scheduler, str(root / "async"), states, {"n": 0})
        times["handed"].append(time.perf_counter() - started)
        times["step_beside"].append(forward_backward())  # training's next step, beside the writer
        before_wait = time.perf_counter()
        pending.wait_written()  # what Checkpointer.before_update does before optimizer.step()
        times["waited"].append(time.perf_counter() - before_wait)
        optimizer.step()
        optimizer.zero_grad()
        pending.wait()
        times["written"].append(pending.seconds)
        barrier()
        started = time.perf_counter()
        plain = root / f"plain-rank{rank()}.pt"
        torch.save({"model": model.unwrap().state_dict(), "optimizer": optimizer.unwrap().state_dict()}, plain)
        barrier()  # the slowest rank decides, as for the booster's save
        times["plain"].append(time.perf_counter() - started)
        plain_size = plain.stat().st_size
    if is_main_process():
        m = {k: statistics.median(v) for k, v in times.items()}
        stall = statistics.median(h + w for h, w in zip(times["handed"], times["waited"], strict=True))
        print(
            f"{args.plugin} {args.config} x{torch.distributed.get_world_size()}, {args.repeats} repeats: booster "
            f"checkpoint {m['booster']:.3f}s ({size / 2**20:.1f} MB), torch.save {m['plain']:.3f}s "
            f"({plain_size / 2**20:.1f} MB per rank); ratio {m['booster'] / m['plain']:.2f}x"
        )
        print(
            f"  --async_save: training stalls {stall:.3f}s ({stall / m['booster']:.0%} of the synchronous save): "
            f"{m['handed']:.3f}s to hand it to the writer, {m['waited']:.3f}s waiting before the update; the "
            f"write completes after {m['written']:.3f}s; the forward and backward beside it took "
            f"{m['step_beside']:.3f}s vs {m['step_alone']:.3f}s alone ({args.batch_size}x{args.seq_len} tokens per rank)"
        )
    barrier()
    if is_main_process():
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
