"""The pretraining loop: build the pieces, then step, log and checkpoint until done."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import plugins
from .attention import select_attention
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig, UsageError
from .data import SYNTHETIC, PretrainBatches, SyntheticBatches, build_pretrain_batches, count_tokens, load_tokenizer
from .metrics import MetricsLogger, peak_memory_mb
from .model import build_model, count_parameters, get_model_config
from .optim import build_lr_scheduler, build_optimizer


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0


def _to_device(batch: dict) -> dict:
    dev = plugins.device()
    return {k: v.to(dev, non_blocking=True) for k, v in batch.items()}


def train_step(par: plugins.Parallelism, model, optimizer, batches: PretrainBatches, accumulation_steps: int):
    """Forward and backward over `accumulation_steps` micro-batches; returns this rank's mean loss
    (None on pipeline stages other than the last)."""
    if par.pipeline:
        return plugins.run_pipeline(par, model, optimizer, _to_device(batches.next_batch()))
    total = None
    for micro_step in range(accumulation_steps):
        batch = _to_device(batches.next_batch())
        is_last = micro_step == accumulation_steps - 1
        with plugins.no_sync_context(par, model, optimizer, is_last):
            with plugins.forward_context(par):
                loss = model(**batch).loss / accumulation_steps
            par.booster.backward(loss, optimizer)
        total = loss.detach() if total is None else total + loss.detach()
    return total


def steps_for_epochs(cfg: TrainConfig, tokenizer, par: plugins.Parallelism, seq_len: int) -> int:
    """Optimizer steps in `-e` epochs, from a token count of the data (the replica with the least data decides)."""
    tokens = count_tokens(cfg.dataset, tokenizer, par.dp_rank, par.dp_size, progress=plugins.is_main_process())
    steps = torch.tensor([tokens // seq_len // (cfg.batch_size * cfg.accumulation_steps)], device=plugins.device())
    dist.all_reduce(steps, op=dist.ReduceOp.MIN)
    steps_per_epoch = int(steps.item())
    if steps_per_epoch == 0:
        raise UsageError(
            f"the data holds fewer than {seq_len * cfg.batch_size * cfg.accumulation_steps} tokens per replica, "
            "not enough for one step; lower -b/-l/--accumulation_steps or add data"
        )
    return steps_per_epoch * cfg.num_epochs


def pretrain(cfg: TrainConfig) -> dict:
    plugins.launch(cfg.seed)
    par = plugins.build_parallelism(cfg)
    main = plugins.is_main_process()

    def say(message: str) -> None:
        if main:
            print(message, flush=True)

    # Model
    model_config = get_model_config(cfg.config)
    tokenizer = load_tokenizer(cfg.tokenizer)
    if len(tokenizer) > model_config.vocab_size:
        raise UsageError(
            f"tokenizer has {len(tokenizer)} tokens but the model only {model_config.vocab_size}; pick a matching -c/--tokenizer"
        )
    seq_len = cfg.max_length or model_config.max_position_embeddings
    attn_implementation, attn_message = select_attention(cfg.flash_attention)
    if attn_message:
        say(attn_message)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    with plugins.model_init_context(par):
        model = build_model(model_config, attn_implementation)
    if cfg.grad_checkpoint:
        model.gradient_checkpointing_enable()
    say(
        f"model {cfg.config}: {count_parameters(model_config) / 1e6:,.1f}M parameters, {seq_len} tokens per row; "
        f"plugin {cfg.plugin} ({par.precision}), {dist.get_world_size()} processes, {par.dp_size} data-parallel replicas"
    )

    # Data, optimizer, schedule
    if cfg.dataset == SYNTHETIC:
        batches = SyntheticBatches(model_config.vocab_size, seq_len, cfg.batch_size, seed=cfg.seed + par.dp_rank)
        if not cfg.max_steps:
            raise UsageError("-d synthetic has no epochs; pass --max_steps")
    else:
        batches = build_pretrain_batches(cfg.dataset, tokenizer, seq_len, cfg.batch_size, par.dp_rank, par.dp_size)
    total_steps = cfg.max_steps or steps_for_epochs(cfg, tokenizer, par, seq_len)
    if cfg.warmup_steps >= total_steps:
        say(
            f"note: -s/--warmup_steps {cfg.warmup_steps} >= {total_steps} total steps, so the lr never reaches its peak"
        )
    optimizer = build_optimizer(plugins.resolve_optimizer_name(cfg), model, cfg.lr, cfg.weight_decay)
    lr_scheduler = build_lr_scheduler(optimizer, cfg.warmup_steps, total_steps)
    model, optimizer, _, _, lr_scheduler = par.booster.boost(model, optimizer, lr_scheduler=lr_scheduler)

    state = TrainState()
    if cfg.load:
        running_states, data_state = load_checkpoint(par, model, optimizer, lr_scheduler, cfg.load)
        state = TrainState(
            running_states["step"], running_states["consumed_samples"], running_states["consumed_tokens"]
        )
        batches.load_state_dict(data_state)
        say(
            f"resumed from {cfg.load} at step {state.step} (epoch {batches.epoch}, {state.consumed_tokens:,} tokens seen)"
        )

    samples_per_step = cfg.batch_size * cfg.accumulation_steps * par.dp_size
    tokens_per_step = samples_per_step * seq_len
    logger = MetricsLogger(main, cfg.tensorboard_dir, total_steps, state.step, desc="pretraining")
    last_checkpoint, losses, step_seconds = None, [], []

    def checkpoint() -> str:
        running_states = dict(
            step=state.step,
            epoch=batches.epoch,
            consumed_samples=state.consumed_samples,
            consumed_tokens=state.consumed_tokens,
            world_size=dist.get_world_size(),
            dp_size=par.dp_size,
            config=cfg.to_dict(),
        )
        path, seconds = save_checkpoint(
            par, model, optimizer, lr_scheduler, cfg.save_dir, running_states, batches.state_dict()
        )
        logger.print(f"saved checkpoint {path} in {seconds:.1f}s")
        return str(path)

    model.train()
    while state.step < total_steps:
        started = time.perf_counter()
        lr = lr_scheduler.get_last_lr()[0]
        local_loss = train_step(par, model, optimizer, batches, cfg.accumulation_steps)
        grad_norm = plugins.step_optimizer(par, optimizer, cfg.grad_clip)
        lr_scheduler.step()
        optimizer.zero_grad()
        loss = plugins.mean_across_replicas(par, local_loss)  # a sync point: the step is done on every rank
        elapsed = time.perf_counter() - started

        state.step += 1
        state.consumed_samples += samples_per_step
        state.consumed_tokens += tokens_per_step
        if not math.isfinite(loss):
            raise RuntimeError(
                f"loss is {loss} at step {state.step}; lower --lr or raise -s/--warmup_steps, "
                f"and resume from the last good checkpoint ({last_checkpoint or 'none saved yet'})"
            )
        losses.append(loss)
        step_seconds.append(elapsed)
        write = state.step % cfg.log_interval == 0 or state.step == total_steps
        logger.log_step(state.step, loss, lr, grad_norm, tokens_per_step / elapsed, write)
        if cfg.save_dir and cfg.save_interval > 0 and state.step % cfg.save_interval == 0:
            last_checkpoint = checkpoint()
    if cfg.save_dir and losses and (last_checkpoint is None or not last_checkpoint.endswith(f"step-{state.step}")):
        last_checkpoint = checkpoint()
    logger.close()

    # The first step includes warm-up work (allocations, kernel selection); leave it out of the rate.
    timed = step_seconds[1:] or step_seconds
    summary = dict(
        steps=state.step,
        steps_this_run=len(losses),
        first_loss=losses[0] if losses else None,
        final_loss=losses[-1] if losses else None,
        tokens_per_s=tokens_per_step * len(timed) / sum(timed) if timed else None,
        tokens_per_step=tokens_per_step,
        step_seconds=step_seconds,
        losses=losses,
        peak_memory_mb=peak_memory_mb(),
        world_size=dist.get_world_size(),
        dp_size=par.dp_size,
        precision=par.precision,
        checkpoint=last_checkpoint,
        tensorboard_dir=cfg.tensorboard_dir,
    )
    if main and losses:
        print(
            f"done: {summary['steps_this_run']} steps this run (step {state.step} of {total_steps}), "
            f"loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}, "
            f"{summary['tokens_per_s']:,.0f} tokens/s, peak memory {peak_memory_mb():,.0f} MB on rank 0\n"
            f"checkpoint: {last_checkpoint or 'none (no -o/--save_dir)'}\n"
            f"tensorboard: {cfg.tensorboard_dir or 'disabled'}"
            + (f"  (tensorboard --logdir {cfg.tensorboard_dir})" if cfg.tensorboard_dir else ""),
            flush=True,
        )
    return summary
