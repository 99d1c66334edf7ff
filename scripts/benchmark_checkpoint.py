"""Time a sharded booster checkpoint against a plain torch.save of the same state, side by side.

    torchrun --standalone --nproc_per_node 1 scripts/benchmark_checkpoint.py -c small -p zero2

The checkpoint (model, optimizer, scheduler, data position, RNG, running states) is saved through
the booster exactly as training saves it; the baseline is every rank's `torch.save` of the model
and optimizer state dicts it holds, to the same disk. Both are repeated, interleaved, and the
medians compared. With one process both write exactly the same state.
"""

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama_recipe import plugins  # noqa: E402
from llama_recipe.checkpoint import save_checkpoint  # noqa: E402
from llama_recipe.config import TrainConfig  # noqa: E402
from llama_recipe.data import SyntheticBatches  # noqa: E402
from llama_recipe.model import build_model, get_model_config  # noqa: E402
from llama_recipe.optim import build_lr_scheduler, build_optimizer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-c", "--config", default="small")
    p.add_argument("-p", "--plugin", default="zero2", choices=["ddp", "zero2", "zero2_cpu"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dir", default="runs/checkpoint-benchmark", help="where to write (removed afterwards)")
    args = p.parse_args()
    cfg = TrainConfig(config=args.config, plugin=args.plugin)

    plugins.launch(seed=0)
    par = plugins.build_parallelism(cfg)
    model_config = get_model_config(cfg.config)
    model = build_model(model_config)
    optimizer = build_optimizer("adamw", model, 1e-4, 0.1)
    scheduler = build_lr_scheduler(optimizer, 0, 10)
    model, optimizer, _, _, scheduler = par.booster.boost(model, optimizer, lr_scheduler=scheduler)
    batch = {
        k: v.to(plugins.device()) for k, v in SyntheticBatches(model_config.vocab_size, 128, 2, 0).next_batch().items()
    }
    par.booster.backward(model(**batch).loss, optimizer)  # one step, so the optimizer has its state
    optimizer.step()
    optimizer.zero_grad()

    root = Path(args.dir)
    booster_s, plain_s = [], []
    for i in range(args.repeats):  # interleaved, so both see the same machine noise
        states = dict(step=i + 1, epoch=0, consumed_samples=0, consumed_tokens=0, layout={}, config=cfg.to_dict())
        _, seconds, size = save_checkpoint(par, model, optimizer, scheduler, str(root / "booster"), states, {"n": 0})
        booster_s.append(seconds)
        plugins.barrier()
        started = time.perf_counter()
        plain = root / f"plain-rank{plugins.rank()}.pt"
        torch.save({"model": model.unwrap().state_dict(), "optimizer": optimizer.unwrap().state_dict()}, plain)
        plugins.barrier()  # the slowest rank decides, as for the booster's save
        plain_s.append(time.perf_counter() - started)
        plain_size = plain.stat().st_size
    if plugins.is_main_process():
        b, t = statistics.median(booster_s), statistics.median(plain_s)
        print(
            f"{args.plugin} {args.config} x{torch.distributed.get_world_size()}, {args.repeats} repeats: booster checkpoint {b:.3f}s ({size / 2**20:.1f} MB), "
            f"torch.save {t:.3f}s ({plain_size / 2**20:.1f} MB per rank); ratio {b / t:.2f}x"
        )
    plugins.barrier()
    if plugins.is_main_process():
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
