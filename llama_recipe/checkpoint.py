"""Sharded checkpoints through the booster, written so that a crash never leaves a half-written
checkpoint that looks complete.

    save_dir/step-<N>/
        model/              booster.save_model (sharded safetensors + index; loads with from_pretrained)
        optimizer/          booster.save_optimizer (sharded)
        lr_scheduler.pt     booster.save_lr_scheduler
        data/rank-<R>.json  each rank's position in the data stream
        running_states.json step, epoch, consumed samples/tokens, layout and the run's config

Everything is written into `.step-<N>.tmp` first; rank 0 writes `running_states.json` last and
renames the folder into place once every rank has finished.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from .config import UsageError
from .plugins import Parallelism, barrier, is_main_process, rank

RUNNING_STATES = "running_states.json"


def checkpoint_path(save_dir: str, step: int) -> Path:
    return Path(save_dir) / f"step-{step}"


def check_checkpoint_dir(path: str) -> None:
    """A checkpoint is complete when its running_states.json exists (it is written last)."""
    p = Path(path)
    if not p.is_dir():
        raise UsageError(
            f"checkpoint {path} does not exist; pass -f with a step-<N> directory under your -o/--save_dir"
        )
    if not (p / RUNNING_STATES).is_file() or not (p / "model").is_dir():
        raise UsageError(
            f"{path} is not a complete checkpoint (no {RUNNING_STATES} or model/); pass -f with a step-<N> directory"
        )


def save_checkpoint(
    par: Parallelism, model, optimizer, lr_scheduler, save_dir: str, running_states: dict, data_state: dict
) -> tuple[Path, float]:
    """Returns the checkpoint directory and the seconds the save took."""
    started = time.perf_counter()
    final = checkpoint_path(save_dir, running_states["step"])
    tmp = final.with_name(f".{final.name}.tmp")
    if is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)  # debris of an earlier crashed save
        (tmp / "data").mkdir(parents=True)
    barrier()

    par.booster.save_model(model, str(tmp / "model"), shard=True, use_safetensors=True)
    par.booster.save_optimizer(optimizer, str(tmp / "optimizer"), shard=True)
    par.booster.save_lr_scheduler(lr_scheduler, str(tmp / "lr_scheduler.pt"))
    (tmp / "data" / f"rank-{rank()}.json").write_text(json.dumps(data_state))
    barrier()

    if is_main_process():
        running_states = dict(running_states, saved_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        (tmp / RUNNING_STATES).write_text(json.dumps(running_states, indent=2))
        if final.exists():  # re-saving the same step: swap, then drop the old copy
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
    barrier()
    return final, time.perf_counter() - started


def load_checkpoint(par: Parallelism, model, optimizer, lr_scheduler, path: str) -> tuple[dict, dict]:
    """Restore model, optimizer and scheduler in place; return (running_states, this rank's data state)."""
    check_checkpoint_dir(path)
    p = Path(path)
    running_states = json.loads((p / RUNNING_STATES).read_text())
    if running_states["dp_size"] != par.dp_size:
        raise UsageError(
            f"{path} was saved with {running_states['dp_size']} data-parallel replicas and this run has {par.dp_size}; "
            "the data position cannot be split differently, so resume with the same number of processes and --tp/--pp"
        )
    par.booster.load_model(model, str(p / "model"))
    par.booster.load_optimizer(optimizer, str(p / "optimizer"))
    par.booster.load_lr_scheduler(lr_scheduler, str(p / "lr_scheduler.pt"))
    data_file = p / "data" / f"rank-{rank()}.json"
    if not data_file.is_file():
        raise UsageError(f"{path} has no data position for rank {rank()}; resume with the layout it was saved with")
    return running_states, json.loads(data_file.read_text())
