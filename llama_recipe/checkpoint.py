"""Sharded checkpoints through the booster, written so that a crash never leaves a half-written
checkpoint that looks complete, and never touches the previous good one.

    save_dir/step-<N>/
        model/              booster.save_model (sharded safetensors + index + config.json) and the tokenizer:
                            a Hugging Face model directory that from_pretrained loads
        optimizer/          booster.save_optimizer (sharded; includes the fp16 loss scaler where there is one)
        lr_scheduler.pt     booster.save_lr_scheduler
        data/rank-<R>.json  each rank's position in the data stream
        rng/rank-<R>.pt     each rank's random number generator states
        running_states.json step, epoch, consumed samples/tokens, layout and the run's config (written last)
    save_dir/latest         the name of the newest complete checkpoint

Everything is written into `.step-<N>.tmp`; rank 0 writes `running_states.json` last and renames the
folder into place once every rank has finished, then points `latest` at it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import TrainConfig
from .distributed import barrier, is_main_process, print_main, rank, world_size
from .errors import CheckpointError, UsageError
from .parallel import Parallelism

RUNNING_STATES = "running_states.json"
LATEST = "latest"
# Model-shape fields that must agree between a checkpoint and the run that loads it.
SHAPE_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
)


def checkpoint_path(save_dir: str, step: int) -> Path:
    return Path(save_dir) / f"step-{step}"


def _step_of(path: Path) -> int:
    return int(path.name.split("-", 1)[1])


def complete_checkpoints(save_dir: str) -> list[Path]:
    """The complete step-<N> checkpoints in save_dir, oldest first."""
    root = Path(save_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.name[5:].isdigit() and (p / RUNNING_STATES).is_file()]
    return sorted(found, key=_step_of)


def resolve_load_path(load: str | None, save_dir: str, auto_resume: bool) -> str | None:
    """`-f latest` (or --auto_resume) means the checkpoint save_dir/latest names."""
    if load not in (None, LATEST) or not (load == LATEST or auto_resume):
        return load
    pointer = Path(save_dir) / LATEST
    if pointer.is_file():
        return str(Path(save_dir) / pointer.read_text().strip())
    if load == LATEST:
        raise UsageError(
            f"-f latest: {pointer} does not exist (no complete checkpoint in -o {save_dir}); drop -f to start fresh"
        )
    return None  # --auto_resume with nothing to resume: start fresh


def read_running_states(path: str) -> dict:
    """The running states of a complete checkpoint; UsageError naming what is wrong otherwise."""
    p = Path(path)
    if not p.is_dir():
        raise UsageError(
            f"checkpoint {path} does not exist; pass -f with a step-<N> directory under your -o/--save_dir"
        )
    if not (p / RUNNING_STATES).is_file():
        raise UsageError(f"{path} is not a complete checkpoint (no {RUNNING_STATES}); pass -f with a complete step-<N>")
    try:
        states = json.loads((p / RUNNING_STATES).read_text())
        assert isinstance(states, dict) and "step" in states
    except (json.JSONDecodeError, UnicodeDecodeError, AssertionError):
        raise UsageError(f"{p / RUNNING_STATES} is corrupt; pass -f with another checkpoint") from None
    for part in ("model", "optimizer", "lr_scheduler.pt"):
        if not (p / part).exists():
            raise UsageError(f"{path} is incomplete: {part} is missing; pass -f with another checkpoint")
    return states


def check_checkpoint_dir(path: str, model_config=None) -> None:
    """Fail early on a missing, partial or corrupt checkpoint, or one of another model shape."""
    read_running_states(path)
    if model_config is None:
        return
    try:
        saved = json.loads((Path(path) / "model" / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise UsageError(f"{path}/model/config.json is missing or corrupt; pass -f with another checkpoint") from None
    different = [
        f"{k} {saved.get(k)} vs {getattr(model_config, k)}"
        for k in SHAPE_FIELDS
        if saved.get(k, getattr(model_config, k)) != getattr(model_config, k)
    ]
    if different:
        raise UsageError(
            f"{path} holds a different model ({'; '.join(different)}, checkpoint vs -c); pass the -c it was trained with"
        )


def _directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_latest(save_dir: str, name: str) -> None:
    tmp = Path(save_dir) / f".{LATEST}.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, Path(save_dir) / LATEST)  # atomic: readers see the old or the new name, never half


def _prune(save_dir: str, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints; returns what was deleted."""
    doomed = complete_checkpoints(save_dir)[:-keep_last] if keep_last > 0 else []
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)
    return doomed


def save_checkpoint(
    par: Parallelism,
    model,
    optimizer,
    lr_scheduler,
    save_dir: str,
    running_states: dict,
    data_state: dict,
    tokenizer=None,
    keep_last: int = 0,
) -> tuple[Path, float, int]:
    """Returns the checkpoint directory, the seconds the save took and its size in bytes."""
    started = time.perf_counter()
    final = checkpoint_path(save_dir, running_states["step"])
    tmp = final.with_name(f".{final.name}.tmp")
    try:
        if is_main_process():
            shutil.rmtree(tmp, ignore_errors=True)  # debris of an earlier crashed save
            (tmp / "data").mkdir(parents=True)
            (tmp / "rng").mkdir()
        barrier()
        par.booster.save_model(model, str(tmp / "model"), shard=True, use_safetensors=True)
        par.booster.save_optimizer(optimizer, str(tmp / "optimizer"), shard=True)
        par.booster.save_lr_scheduler(lr_scheduler, str(tmp / "lr_scheduler.pt"))
        (tmp / "data" / f"rank-{rank()}.json").write_text(json.dumps(data_state))
        torch.save(_rng_state(), tmp / "rng" / f"rank-{rank()}.pt")
        barrier()
        size = 0
        if is_main_process():
            if tokenizer is not None:  # makes model/ a complete Hugging Face model directory
                tokenizer.save_pretrained(tmp / "model")
            running_states = dict(running_states, saved_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
            (tmp / RUNNING_STATES).write_text(json.dumps(running_states, indent=2))
            size = _directory_bytes(tmp)
            if final.exists():  # re-saving the same step: swap, then drop the old copy
                old = final.with_name(f".{final.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old)
            else:
                tmp.rename(final)
            _write_latest(save_dir, final.name)
            _prune(save_dir, keep_last)
        barrier()
    except OSError as e:  # a full disk, a quota, a vanished mount: earlier checkpoints are untouched
        if is_main_process():
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"saving {final} failed ({e.strerror or e}); the previous checkpoints in {save_dir} are intact"
        ) from None
    return final, time.perf_counter() - started, size


def load_checkpoint(
    par: Parallelism, model, optimizer, lr_scheduler, path: str, layout: dict
) -> tuple[dict, dict | None]:
    """Restore a checkpoint in place. Returns (running_states, this rank's data state or None).

    Under the layout it was saved with, everything comes back: model, optimizer, scheduler, data
    position, RNG. Under another layout (another plugin or another number of replicas), only the
    model weights and the schedule position can be resharded; the caller is told (data state None).
    """
    running_states = read_running_states(path)
    p = Path(path)
    same_layout = running_states.get("layout") == layout
    try:
        par.booster.load_model(model, str(p / "model"))
        par.booster.load_lr_scheduler(lr_scheduler, str(p / "lr_scheduler.pt"))
        if not same_layout:
            return running_states, None
        par.booster.load_optimizer(optimizer, str(p / "optimizer"))
        data_state = json.loads((p / "data" / f"rank-{rank()}.json").read_text())
        _set_rng_state(torch.load(p / "rng" / f"rank-{rank()}.pt", weights_only=False))
    except (
        Exception
    ) as e:  # a truncated shard, a wrong dtype, a missing rank file: all mean this checkpoint is unusable
        raise UsageError(
            f"could not load {path} ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else 'no detail'}); "
            "it may be corrupt or from another layout: pass -f with another checkpoint"
        ) from None
    return running_states, data_state


def describe_layout(layout: dict) -> str:
    parts = [layout["plugin"], f"{layout['world_size']} processes"]
    if layout.get("tp", 1) > 1 or layout.get("pp", 1) > 1:
        parts.append(f"tp {layout['tp']} pp {layout['pp']}")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# What the training loop uses


@dataclass
class TrainState:
    """Where a run is: what every checkpoint records besides the model, optimizer and data."""

    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0

    def advance(self, samples: int, tokens: int) -> None:
        self.step += 1
        self.consumed_samples += samples
        self.consumed_tokens += tokens


class Checkpointer:
    """Owns a run's checkpoints: resuming, when to save, saving, and the last good checkpoint."""

    def __init__(self, cfg: TrainConfig, par: Parallelism, tokenizer=None):
        self.cfg = cfg.checkpoint
        self.par = par
        self.tokenizer = tokenizer  # saved into model/, which makes it a complete Hugging Face directory
        self.run_config = cfg.to_dict()
        self.layout = dict(
            plugin=cfg.parallel.plugin, world_size=world_size(), dp_size=par.dp_size, tp=cfg.parallel.tp,
            pp=cfg.parallel.pp, zero_stage=cfg.parallel.zero_stage,
        )  # fmt: skip
        self.last: str | None = None  # the newest checkpoint this run wrote

    def resume(self, model, optimizer, lr_scheduler, batches, initial_weights: str | None = None) -> TrainState:
        """Restore `-f`'s checkpoint (everything, or only weights and schedule under another layout),
        else load `initial_weights` (finetuning), else start fresh."""
        if not self.cfg.load:
            if initial_weights:
                self.par.booster.load_model(model, initial_weights)
                print_main(f"loaded weights from {initial_weights}")
            return TrainState()
        started = time.perf_counter()
        states, data_state = load_checkpoint(self.par, model, optimizer, lr_scheduler, self.cfg.load, self.layout)
        state = TrainState(states["step"], states["consumed_samples"], states["consumed_tokens"])
        if data_state is not None:
            batches.load_state_dict(data_state)
            print_main(
                f"resumed from {self.cfg.load} at step {state.step} (epoch {batches.epoch}, "
                f"{state.consumed_tokens:,} tokens seen) in {time.perf_counter() - started:.1f}s"
            )
        else:
            saved_layout = describe_layout(states.get("layout", {"plugin": "?", "world_size": "?"}))
            print_main(
                f"{self.cfg.load} was saved with {saved_layout}; this run uses {describe_layout(self.layout)}: "
                f"loaded the model weights and the schedule position (step {state.step}). Optimizer state and "
                "data position cannot be resharded across layouts: the optimizer starts fresh and the data "
                "stream restarts from its beginning"
            )
        return state

    def maybe_save(self, state: TrainState, model, optimizer, lr_scheduler, batches) -> None:
        """Save every --save_interval steps."""
        if self.cfg.save_interval > 0 and state.step % self.cfg.save_interval == 0:
            self.save(state, model, optimizer, lr_scheduler, batches)

    def save_final(self, state: TrainState, model, optimizer, lr_scheduler, batches) -> None:
        """The end of a run is always saved (unless this step already was)."""
        if self.last is None or Path(self.last).name != checkpoint_path("", state.step).name:
            self.save(state, model, optimizer, lr_scheduler, batches)

    def save(self, state: TrainState, model, optimizer, lr_scheduler, batches) -> None:
        if not self.cfg.save_dir:
            return
        running_states = dict(
            step=state.step, epoch=batches.epoch, consumed_samples=state.consumed_samples,
            consumed_tokens=state.consumed_tokens, world_size=self.layout["world_size"], dp_size=self.par.dp_size,
            layout=self.layout, config=self.run_config,
        )  # fmt: skip
        path, seconds, size = save_checkpoint(
            self.par, model, optimizer, lr_scheduler, self.cfg.save_dir, running_states, batches.state_dict(),
            self.tokenizer, self.cfg.keep_last,
        )  # fmt: skip
        print_main(f"saved checkpoint {path} ({size / 2**20:,.1f} MB) in {seconds:.1f}s")
        self.last = str(path)
