"""The training loop, shared by pretraining and finetuning (recipes.py says where the model, the
starting weights and the batches come from).

`fit` reads as the algorithm: build and boost; resume; then per step: train step, non-finite
guard, log, maybe checkpoint, maybe evaluate, stop request; finally save and report. Each piece
has one owner: `Checkpointer` (checkpointer.py), `RunMetrics` (metrics.py), `Evaluator`
(evaluate.py), `StopRequest` (here).
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .attention import ModelInputs, select_attention
from .checkpointer import Checkpointer
from .config import TrainConfig
from .data import mixture_tokens
from .distributed import (
    any_rank,
    device,
    device_memory_gb,
    has_cuda,
    is_main_process,
    print_main,
    synchronize,
    world_size,
)
from .errors import TrainingDiverged
from .evaluate import Evaluator
from .export import export_hf
from .ledger import DataLedger
from .lora import add_adapters
from .loss import target_tokens, token_weighted
from .metrics import RunMetrics, StepResult, reset_peak_memory
from .model import WeightInit, build_model, compile_decoder_layers, count_parameters
from .optim import LRSchedule, build_lr_scheduler, build_optimizer
from .parallel import Parallelism, unwrap_optimizer
from .planner import Shape, fit_warning, unmodelled
from .plugins import CPU_PLUGINS, PLUGIN_NAMES, PLUGINS
from .recompute import enable_recompute, recompute_mode


@dataclass
class RunPlan:
    """What a recipe hands the loop: the model shape, the data and how long to train."""

    model_config: object  # transformers.LlamaConfig
    batches: object  # next_batch(), state_dict(), load_state_dict(), epoch
    total_steps: int
    warmup_steps: int
    tokenizer: object
    seq_len: int
    desc: str = "training"
    initial_weights: str | None = None  # finetuning: the pretrained weights to start from
    held_out: list[dict] | None = None  # batches to evaluate on
    script: str = "pretrain"  # whose flags each checkpoint's run.yaml records


class StopRequest:
    """SIGTERM (what schedulers send before preemption) or Ctrl-C: finish the step, checkpoint, exit.

    Ranks may receive the signal at different moments, so each step they agree (an all-reduce of
    one flag) and stop together. A second Ctrl-C interrupts at once. Used as a context manager, so
    the previous handlers come back however the loop ends.
    """

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopRequest:
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def agreed(self) -> bool:
        """Whether any rank was asked to stop (a collective: every rank must call it)."""
        stop = any_rank(self.signal_name is not None)
        if stop and not self.signal_name:
            self.signal_name = "a stop signal on another rank"
        return stop


def forward_backward(par: Parallelism, model, optimizer, batches, accumulation_steps: int, inputs: ModelInputs):
    """Forward and backward over `accumulation_steps` micro-batches (a pipeline: one batch, which its
    schedule splits). Returns (this rank's share of the step's loss, or None on pipeline stages other
    than the last; the tokens it trained on; seconds spent waiting for data).

    The step's gradient is that of the mean loss over every target token of the global batch (all
    micro-steps, all replicas), so accumulation and replicas give what one batch of that size would:
    the step's target tokens are counted first, over all its micro-batches and (one all-reduce) all
    replicas, and each micro-batch's loss is weighted by its own (`token_weighted`). Summed over the
    micro-batches and averaged over replicas, those losses are that token mean."""
    waited = time.perf_counter()
    micro_batches = [batches.next_batch() for _ in range(1 if par.pipeline else accumulation_steps)]
    data_seconds = time.perf_counter() - waited
    tokens = sum(_tokens_in(batch) for batch in micro_batches)
    per_replica = par.tokens_per_replica(sum(target_tokens(batch["labels"]) for batch in micro_batches))
    if par.pipeline:
        return par.run_pipeline(model, optimizer, inputs(micro_batches[0]), per_replica), tokens, data_seconds
    total_loss = None
    for micro_step, batch in enumerate(micro_batches):
        with par.no_sync(model, optimizer, is_last_micro_step=micro_step == accumulation_steps - 1):
            with par.forward_context():
                loss = token_weighted(model(**inputs(batch)).loss, target_tokens(batch["labels"]), per_replica)
            par.backward(loss, optimizer)
        total_loss = loss.detach() if total_loss is None else total_loss + loss.detach()
    return total_loss, tokens, data_seconds


def _tokens_in(batch: dict) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def train_step(
    par: Parallelism,
    model,
    optimizer,
    lr_scheduler,
    batches,
    cfg: TrainConfig,
    inputs,
    guard: StepGuard | None = None,
    before_update=lambda: None,
) -> StepResult:
    """One optimizer step: forward/backward, clip and step, advance the schedule. A non-finite loss
    or gradient norm skips the update: no weight, optimizer or schedule change (`bad`); so does a
    loss spike when --on_spike says so (`guard`). `before_update` runs before the weights or the
    optimizer state can change (a checkpoint may still be written from them)."""
    started = time.perf_counter()
    lr = lr_scheduler.get_last_lr()[0]
    if par.fused_update:  # in-place SGD updates the weights inside backward
        before_update()
    local_loss, local_tokens, data_seconds = forward_backward(
        par, model, optimizer, batches, cfg.training.accumulation_steps, inputs
    )
    # one all-reduce, and a sync point: every rank knows the step's loss (the replicas' shares averaged: the
    # token mean over the global batch) before anything is updated
    loss, tokens_mean = par.mean_across_replicas(local_loss, local_tokens)
    if cfg.logging.time_breakdown:  # so the clock measures work done, not work queued on a GPU
        synchronize()
    backward_done = time.perf_counter()
    grad_norm, bad = None, not math.isfinite(loss)
    loss_z, spike_skip = guard.judge(loss) if guard else (None, False)
    if not bad and not spike_skip:  # (in-place SGD updated inside backward already, and skipped a non-finite norm)
        before_update()
        grad_norm = par.step(optimizer)  # ddp: skips the update itself on a non-finite norm
    fused_skip = par.fused_update and unwrap_optimizer(optimizer).skipped
    non_finite_norm = grad_norm is not None and not math.isfinite(grad_norm)
    overflow = par.precision == "fp16" and (non_finite_norm or fused_skip)  # loss scaling at work, not a bad step
    bad = bad or (non_finite_norm and not overflow)
    if not (bad or overflow or spike_skip):
        lr_scheduler.step()
    optimizer.zero_grad()
    if cfg.logging.time_breakdown:  # only when asked: a sync each step would stall the CPU behind the GPU
        synchronize()
    optimizer_done = time.perf_counter()
    elapsed = time.perf_counter() - started
    parts = dict(
        data=data_seconds,
        forward_backward=backward_done - started - data_seconds,
        optimizer=optimizer_done - backward_done,
        other=elapsed - (optimizer_done - started),
    )
    slices = mixture_tokens(batches) if cfg.data.data_mix else None
    tokens = round(tokens_mean * par.dp_size)
    communication = par.take_communication()  # --grad_compression, --compress_backprop: what this step sent
    return StepResult(
        loss, tokens, grad_norm, lr, elapsed, parts, overflow, slices, bad, loss_z, spike_skip, communication
    )


class StepGuard:
    """Judges every step's loss before its update, the same on every rank (the loss is all-reduced).

    - A non-finite loss or gradient norm: the update is skipped and counted; `--max_bad_steps` in a
      row stop the run (by then the weights or the data are broken, not one batch).
    - A loss spike: the loss's z-score against the last SPIKE_WINDOW good losses (logged as
      train/loss_z) above `--spike_z`; `--on_spike` says what then: log it, skip the update, stop
      the run, or roll back to the last good checkpoint and go on with the next batches.
    """

    SPIKE_WINDOW, SPIKE_WARMUP = 100, 20  # losses remembered; losses needed before judging

    def __init__(self, training):
        self.limit, self.on_spike, self.spike_z = training.max_bad_steps, training.on_spike, training.spike_z
        self.in_a_row, self.total, self.spikes = 0, 0, 0
        self.history: list[float] = []

    def judge(self, loss: float) -> tuple[float | None, bool]:
        """(the loss's z-score or None, whether to skip the update for a spike)."""
        z = None
        if math.isfinite(loss) and len(self.history) >= self.SPIKE_WARMUP:
            mean = sum(self.history) / len(self.history)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / len(self.history))
            z = (loss - mean) / max(std, 1e-6)
        skip = z is not None and z > self.spike_z and self.on_spike != "log"
        if math.isfinite(loss) and not skip:
            self.history = [*self.history, loss][-self.SPIKE_WINDOW :]
        return z, skip

    def check(self, result: StepResult, step: int, last_checkpoint: str | None) -> bool:
        """Count and report; raise TrainingDiverged to stop; True: roll back to the last checkpoint."""
        if result.loss_z is not None and result.loss_z > self.spike_z:
            self.spikes += 1
            print_main(
                f"step {step}: loss spike, {result.loss:.4f} is {result.loss_z:.1f} standard deviations above "
                f"the last {len(self.history)} steps' ({self.on_spike_words()})"
            )
            if self.on_spike == "stop":
                raise TrainingDiverged(
                    f"a loss spike at step {step} (z = {result.loss_z:.1f} > --spike_z {self.spike_z:g}) stopped the "
                    f"run (--on_spike stop); the last good checkpoint: {last_checkpoint or 'none saved yet'}"
                )
            return self.on_spike == "rollback" and last_checkpoint is not None
        if not result.bad:
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        self.total += 1
        what = f"loss {result.loss}" if not math.isfinite(result.loss) else f"gradient norm {result.grad_norm}"
        print_main(f"step {step}: {what}, update skipped ({self.in_a_row} in a row; the run stops at {self.limit})")
        if self.in_a_row >= self.limit:
            raise TrainingDiverged(
                f"{self.in_a_row} steps in a row (steps {step - self.in_a_row + 1}-{step}) had a non-finite loss or "
                f"gradient norm; stopped. Resume from the last good checkpoint ({last_checkpoint or 'none saved yet'}) "
                "with a lower --lr or a longer warmup"
            )
        return False

    def on_spike_words(self) -> str:
        return {"log": "logged only", "skip": "update skipped", "stop": "stopping", "rollback": "rolling back"}[
            self.on_spike
        ]


def build_boosted(
    cfg: TrainConfig,
    par: Parallelism,
    model_config,
    attn_implementation: str,
    warmup_steps: int,
    total_steps: int,
    initial_weights: str | None = None,
):
    """The model, optimizer and lr schedule, boosted by the plugin. Returns (model, optimizer, lr_scheduler).
    --lora_rank: `initial_weights` are loaded now and frozen, and the optimizer gets only the adapters
    (otherwise the caller loads them into the boosted model)."""
    torch.manual_seed(cfg.training.seed)
    # each weight drawn from (seed, its name): the same initial weights on every rank, plugin and layout
    init = WeightInit(cfg.training.seed, device(), lazy=par.builds_lazily)
    with par.model_init_context():
        # par.weight_dtype: no fp32 master copy may exist, so the weights themselves are 16-bit
        chunked_loss = par.spec.chunked_loss and not cfg.model.unfused_loss
        model = build_model(model_config, attn_implementation, par.weight_dtype, chunked_loss, init)
    enable_recompute(model, recompute_mode(cfg.model))
    if par.lora:
        model = add_adapters(par.booster, model, cfg, initial_weights)
    if cfg.model.compile:
        compile_decoder_layers(model.get_base_model() if par.lora else model)
    opt = cfg.optim
    optimizer = build_optimizer(
        par.optimizer,
        model,
        opt.lr,
        opt.weight_decay,
        beta2=opt.beta2,
        eps=opt.adam_eps,
        max_norm=par.max_norm,
        fp16_loss_scaling=par.precision == "fp16",
        process_group=(par.dp_group or dist.group.WORLD) if par.dp_size > 1 else None,
        tensor_parallel_group=par.tp_group,
        is_sharded=par.is_sharded,
        reference_multiply=opt.collage_reference_multiply,
        monitor=cfg.logging.log_edq,
    )
    schedule = LRSchedule.of(opt, warmup_steps, total_steps)
    lr_scheduler = build_lr_scheduler(optimizer, warmup_steps, total_steps, schedule)
    return par.boost(model, optimizer, lr_scheduler, total_steps, cfg.training.seed)


def announce(cfg: TrainConfig, par: Parallelism, run: RunPlan) -> str:
    """Say what this run is (model, layout, attention kernel); returns the attention implementation."""
    attn_implementation, attn_message = select_attention(cfg.model.flash_attention)
    attn_implementation = par.attention_implementation(attn_implementation)
    for message in [
        attn_message,
        cfg.model.document_attention and f"attention confined to documents ({attn_implementation})",
    ]:
        if message:
            print_main(message)
    print_main(
        f"model: {count_parameters(run.model_config) / 1e6:,.1f}M parameters; plugin {cfg.parallel.plugin} "
        f"({par.precision}), optimizer {par.optimizer}, {world_size()} processes, {par.dp_size} data-parallel "
        f"replicas; {run.total_steps} steps"
    )
    warn_if_too_big(cfg, run)
    # a run sized by epochs learns here (before the model is built) whether a wsd decay fits it
    print_main(f"lr schedule: {LRSchedule.of(cfg.optim, run.warmup_steps, run.total_steps).describe()}")
    if run.warmup_steps >= run.total_steps:
        print_main(
            f"note: {run.warmup_steps} warmup steps >= {run.total_steps} total steps, so the lr never reaches its peak"
        )
    return attn_implementation


def warn_if_too_big(cfg: TrainConfig, run: RunPlan) -> None:
    """One line on rank 0 when the planner (planner.py) predicts this run's peak per device above the
    device's memory (--device_memory overrides it), with a layout of the same devices that fits."""
    if unmodelled(cfg):
        return
    # (on CPU the host is the device: offloading to it saves nothing)
    plugins = PLUGIN_NAMES if has_cuda() else [n for n in CPU_PLUGINS if not PLUGINS[n].offloads_optimizer]
    plugins = [n for n in plugins if PLUGINS[n].planned]
    memory = cfg.parallel.device_memory or device_memory_gb()
    warning = fit_warning(cfg, Shape.of(run.model_config), run.seq_len, world_size(), memory, plugins)
    if warning:
        print_main(warning)


def fit(cfg: TrainConfig, par: Parallelism, run: RunPlan) -> dict:
    """Train `run` under `par`; returns the run's summary (see RunMetrics.finish)."""
    attn_implementation = announce(cfg, par, run)
    model, optimizer, lr_scheduler = build_boosted(
        cfg, par, run.model_config, attn_implementation, run.warmup_steps, run.total_steps, run.initial_weights
    )
    dtype = next(model.parameters()).dtype
    inputs = ModelInputs(attn_implementation, cfg.model.document_attention, dtype, par.sequence_parallel)
    checkpointer = Checkpointer(cfg, par, run.tokenizer, run.script)
    # (LoRA loaded the pretrained weights before adding its adapters: build_boosted; full finetuning loads them now)
    state = checkpointer.resume(model, optimizer, lr_scheduler, run.batches, None if par.lora else run.initial_weights)
    batches = DataLedger(cfg, run.batches, state.step, checkpointer.data_resumed_exactly)  # what each step read
    # (the W&B run's id goes into checkpointer.recorded: each checkpoint keeps it for a resume)
    metrics = RunMetrics(cfg, par, run, state.step, checkpointer.recorded)
    evaluator = Evaluator(par, run.held_out, inputs) if run.held_out else None
    if evaluator and state.step == 0:
        metrics.log_eval(state.step, evaluator(model))  # the starting point, so the run shows what training changed
    model.train()
    reset_peak_memory()
    guard = StepGuard(cfg.training)
    with metrics, StopRequest() as stop, batches:
        while state.step < run.total_steps:
            step = train_step(
                par, model, optimizer, lr_scheduler, batches, cfg, inputs, guard, checkpointer.before_update
            )
            state.advance(cfg.training.batch_size * cfg.training.accumulation_steps * par.dp_size, step.tokens)
            metrics.log_step(state.step, step, optimizer, guard.total + step.bad)
            roll_back = guard.check(step, state.step, checkpointer.last)  # --on_spike rollback
            batches.write(state.step, quarantine=step.bad or roll_back)  # a suspect batch's documents: never again
            if roll_back:
                state = checkpointer.roll_back(state, model, optimizer, lr_scheduler)
                continue
            if not guard.in_a_row:  # the last good checkpoint stays the last one saved before a bad streak
                checkpointer.maybe_save(state, model, optimizer, lr_scheduler, run.batches)
            if evaluator and every(cfg.training.eval_interval, state.step):
                metrics.log_eval(state.step, evaluator(model))
            if stop.agreed():
                print_main(f"{stop.signal_name} received: stopping at the end of step {state.step}")
                break
        if metrics.steps:
            checkpointer.save_final(state, model, optimizer, lr_scheduler, run.batches)
    if evaluator and metrics.steps and metrics.last_eval_step != state.step:
        metrics.log_eval(state.step, evaluator(model))
    summary = metrics.finish(state.step, checkpointer.last)
    if cfg.checkpoint.export_hf and checkpointer.last and is_main_process():
        export_hf(checkpointer.last, cfg.checkpoint.export_hf, save_dir=cfg.checkpoint.save_dir)
        print_main(f"exported a Hugging Face model to {cfg.checkpoint.export_hf}")
    return summary


def every(interval: int, step: int) -> bool:
    """Whether `step` is one of every `interval` steps (never when interval <= 0)."""
    return interval > 0 and step % interval == 0
