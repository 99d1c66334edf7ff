"""What the training loop uses: `TrainState` (where a run is) and `Checkpointer`, which owns a
run's checkpoints: resuming, when to save, saving (in the background with --async_save), the last
good checkpoint, and rolling back to it."""

from __future__ import annotations

import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .background_save import BackgroundSave, start_background_save
from .checkpoint_io import describe_layout, load_checkpoint, run_file_text, run_layout, save_checkpoint
from .checkpoint_paths import checkpoint_path, set_aside
from .config import TrainConfig
from .distributed import any_rank, is_main_process, print_main, world_size
from .errors import CheckpointError, TrainingDiverged
from .parallel import Parallelism
from .validation import MUST_MATCH_ON_RESUME, flag_differences


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

    def __init__(self, cfg: TrainConfig, par: Parallelism, tokenizer=None, script: str = "pretrain"):
        self.cfg = cfg.checkpoint
        self.par = par
        self.tokenizer = tokenizer  # saved into model/, which makes it a complete Hugging Face directory
        self.run_config = cfg.to_dict()
        self.run_file = run_file_text(cfg, script)  # run.yaml: `script`.py --config_file reads it back
        self.layout = run_layout(cfg, world_size())
        self.recorded: dict = {}  # what other owners keep in each checkpoint's running states (the W&B run id)
        self.last: str | None = None  # the newest checkpoint this run completed
        self.last_size = 0  # its bytes: what the next save will need again
        self.pending: BackgroundSave | None = None  # --async_save: the checkpoint being written
        self.write_timeout = cfg.parallel.dist_timeout  # how long rank 0's writer waits for the other ranks' files
        self.data_resumed_exactly = False  # the data stream goes on exactly from the checkpoint (same layout)
        self.replaced = None  # --replace_checkpoints: where the earlier run's checkpoints wait until this run saved
        if self.cfg.replace_checkpoints and self.cfg.save_dir and self.cfg.load is None and is_main_process():
            self.replaced = set_aside(self.cfg.save_dir)

    def resume(self, model, optimizer, lr_scheduler, batches, initial_weights: str | None = None) -> TrainState:
        """Restore `-f`'s checkpoint (all of it, less what --reset_* leaves out; under another layout
        what can move, validated before), else load `initial_weights` (finetuning), else start fresh."""
        if not self.cfg.load:
            if initial_weights:
                self.par.booster.load_model(model, initial_weights)
                print_main(f"loaded weights from {initial_weights}")
            return TrainState()
        started, cfg = time.perf_counter(), self.cfg
        states, data_state = load_checkpoint(
            self.par,
            model,
            optimizer,
            lr_scheduler,
            cfg.load,
            self.layout,
            optimizer_too=not cfg.reset_optimizer,
            schedule_too=not cfg.reset_schedule,
            data_too=not cfg.reset_data,
            compression_too=not cfg.reset_compression,
        )
        state = TrainState(states["step"], states["consumed_samples"], states["consumed_tokens"])
        if cfg.reset_schedule:  # this run's schedule, continued from the checkpoint's step
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": on purpose
                for _ in range(state.step):
                    lr_scheduler.step()
        # what the new schedule changes, e.g. `--lr_schedule 'cosine' -> 'wsd', --max_steps 6000 -> 7500`
        changed = flag_differences(states.get("config", {}), self.run_config, MUST_MATCH_ON_RESUME["--reset_schedule"])
        schedule = f"this run's lr schedule, from step {state.step}" + (f" ({', '.join(changed)})" if changed else "")
        resets = [
            f"{flag}: {what}"
            for flag, what, on in [
                ("--reset_optimizer", "the optimizer starts fresh", cfg.reset_optimizer),
                ("--reset_data", "the data stream starts from its beginning", cfg.reset_data),
                ("--reset_schedule", schedule, cfg.reset_schedule),
            ]
            if on
        ]
        if resets:
            print_main("resuming with " + "; ".join(resets))
        if isinstance(data_state, list):  # saved under another layout: the data moves
            batches.load_elastic(data_state, self.par.dp_size)
        elif data_state is not None:
            batches.load_state_dict(data_state)
            self.data_resumed_exactly = True
        saved = states.get("layout", {})
        if saved != self.layout:
            print_main(
                f"{cfg.load} was saved with {describe_layout(saved)}; this run uses {describe_layout(self.layout)}: "
                "the weights, schedule"
                + (", optimizer state" if not cfg.reset_optimizer else "")
                + (" and data position" if data_state is not None else "")
                + " moved to the new layout"
            )
        print_main(
            f"resumed from {cfg.load} at step {state.step} (epoch {batches.epoch}, "
            f"{state.consumed_tokens:,} tokens seen) in {time.perf_counter() - started:.1f}s"
        )
        return state

    def roll_back(self, state: TrainState, model, optimizer, lr_scheduler) -> TrainState:
        """--on_spike rollback: the last good checkpoint's weights, optimizer and schedule again; the
        data reads on, so the batches since that checkpoint (the spike's among them) are skipped."""
        self.finish_background()
        states, _ = load_checkpoint(self.par, model, optimizer, lr_scheduler, self.last, self.layout, data_too=False)
        print_main(
            f"rolled back to {self.last} (step {states['step']}): the batches of steps {states['step'] + 1}-{state.step} "
            "are skipped, and training goes on with the next ones"
        )
        return TrainState(states["step"], state.consumed_samples, state.consumed_tokens)

    def maybe_save(self, state: TrainState, model, optimizer, lr_scheduler, batches) -> None:
        """Save every --save_interval steps."""
        if self.cfg.save_interval > 0 and state.step % self.cfg.save_interval == 0:
            self.save(state, model, optimizer, lr_scheduler, batches, background=self.cfg.async_save)

    def save_final(self, state: TrainState, model, optimizer, lr_scheduler, batches) -> None:
        """The end of a run is always saved (unless this step already was), and a save still being
        written in the background is waited for (so SIGTERM and the end of a run leave it complete)."""
        self.finish_background()
        if self.last is None or Path(self.last).name != checkpoint_path("", state.step).name:
            self.save(state, model, optimizer, lr_scheduler, batches)

    def save(self, state: TrainState, model, optimizer, lr_scheduler, batches, background: bool = False) -> None:
        """Save now; with `background`, stall only to hand the state to a writer thread (BackgroundSave)."""
        if not self.cfg.save_dir:
            return
        self.finish_background()  # a second save waits for the first
        if any_rank(not all(bool(torch.isfinite(p).all()) for p in model.parameters())):  # this rank's shards
            raise TrainingDiverged(
                f"the weights are not finite at step {state.step}, so they were not saved; resume from the last "
                f"good checkpoint ({self.last or 'none saved by this run'}) with a lower --lr or a longer warmup"
            )
        running_states = dict(
            step=state.step,
            epoch=batches.epoch,
            consumed_samples=state.consumed_samples,
            consumed_tokens=state.consumed_tokens,
            world_size=self.layout["world_size"],
            dp_size=self.par.dp_size,
            layout=self.layout,
            config=self.run_config,
            **self.recorded,
        )
        what = (self.par, model, optimizer, lr_scheduler, self.cfg.save_dir, running_states, batches.state_dict())
        what += (self.tokenizer, self.cfg.keep_last, self.run_file)  # the same arguments for either writer
        try:
            self._check_room(model)
            if background:
                started = time.perf_counter()
                self.pending = start_background_save(*what, timeout=self.write_timeout)
                print_main(
                    f"checkpoint {self.pending.final}: training stalled {time.perf_counter() - started:.2f}s to hand it "
                    "to the background writer, which writes it while the next step computes"
                )
                return
            path, seconds, size = save_checkpoint(*what)
        except CheckpointError as e:
            if not self.cfg.continue_on_save_error:
                raise
            print_main(f"warning: {e}; training on (--continue_on_save_error), the next save will try again")
            return
        print_main(f"saved checkpoint {path} ({size / 2**20:,.1f} MB) in {seconds:.1f}s")
        self._saved(path, size)

    def _saved(self, path: Path, size: int) -> None:
        """A checkpoint of this run is complete: it is the last good one, and what --replace_checkpoints
        set aside can go."""
        self.last, self.last_size = str(path), size
        if self.replaced is not None:
            shutil.rmtree(self.replaced)
            print_main(f"deleted the earlier run's checkpoints in {self.replaced}: this run saved {path}")
            self.replaced = None

    def before_update(self) -> None:
        """Called before training changes the weights or the optimizer state: a checkpoint still
        being written from them is finished first (--async_save; at once otherwise)."""
        if self.pending is not None:
            self.pending.wait_written()

    def finish_background(self) -> None:
        """Wait for the checkpoint being written in the background, if any (every rank calls it)."""
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        if pending.wait():
            size = f" ({pending.size / 2**20:,.1f} MB)" if pending.size else ""
            print_main(
                f"saved checkpoint {pending.final}{size} in {pending.seconds:.1f}s, in the background (training "
                f"waited {pending.waited:.2f}s for it before the next update)"
            )
            self._saved(pending.final, pending.size)
            return
        reason = f"{type(pending.error).__name__}: {pending.error}" if pending.error else "on another rank"
        error = CheckpointError(
            f"saving {pending.final} in the background failed ({reason}); the previous checkpoints in "
            f"{self.cfg.save_dir} are intact"
        )
        if not self.cfg.continue_on_save_error:
            raise error from pending.error  # (LLAMA_RECIPE_DEBUG=1 shows its traceback)
        print_main(f"warning: {error}; training on (--continue_on_save_error), the next save will try again")

    def _check_room(self, model) -> None:
        """Refuse a save the disk cannot hold before any rank writes a byte, all ranks agreeing (a
        rank failing mid-write while the others wait for it would hang them). It needs what the last
        save took, or for the first one at least the weights."""
        root = Path(self.cfg.save_dir)
        free = shutil.disk_usage(next(p for p in [root, *root.parents] if p.exists())).free
        need = self.last_size or sum(p.numel() * p.element_size() for p in model.parameters())
        if any_rank(is_main_process() and free < need):
            raise CheckpointError(
                f"saving to {root} needs about {need / 2**20:,.0f} MB but {free / 2**20:,.0f} MB are free; "
                f"the previous checkpoints are intact (the last: {self.last or 'none by this run'}); free some space"
            )
