"""The training loop, shared by pretraining and finetuning.

`pretrain()` and `finetune()` only decide where the model shape, the starting weights and the
batches come from; `fit()` does the rest: build, boost, resume, then step, log and checkpoint.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import plugins
from .attention import model_inputs, select_attention
from .checkpoint import describe_layout, load_checkpoint, save_checkpoint
from .collage import edq_metrics
from .config import SHIPPED_TOKENIZER, TrainConfig, UsageError
from .data import (
    SKIPPED,
    SYNTHETIC,
    Prefetcher,
    SyntheticBatches,
    build_pretrain_batches,
    count_tokens,
    load_model_tokenizer,
    load_tokenizer,
)
from .instruct import (
    InstructionBatches,
    generate_answers,
    held_out_batches,
    load_instruction_rows,
    split_held_out,
)
from .metrics import (
    MFU_FORMULA,
    MetricsLogger,
    model_flops_utilization,
    peak_flops_per_device,
    peak_memory_mb,
    reset_peak_memory,
    training_flops_per_token,
)
from .model import build_model, count_parameters, get_model_config, resolve_pretrained, weights_location
from .optim import build_lr_scheduler, build_optimizer
from .prepared import PreparedBatches, check_prepared_tokenizer, is_prepared_dataset


class StopRequest:
    """SIGTERM (what schedulers send before preemption) or Ctrl-C: finish the step, checkpoint, exit.

    Ranks may receive the signal at different moments, so each step they agree (an all-reduce of
    one flag) and stop together. A second Ctrl-C interrupts at once.
    """

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def agreed(self) -> bool:
        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=plugins.device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not self.signal_name:
            self.signal_name = "a stop signal on another rank"
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0


def _to_device(batch: dict) -> dict:
    dev = plugins.device()
    return {k: v.to(dev, non_blocking=True) for k, v in batch.items()}


def _tokens_in(batch: dict) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def train_step(par: plugins.Parallelism, model, optimizer, batches, accumulation_steps: int, inputs):
    """Forward and backward over `accumulation_steps` micro-batches. `inputs` turns a batch into the
    model's arguments. Returns (this rank's mean loss, or None on pipeline stages other than the
    last; the number of tokens it trained on; the seconds spent waiting for data)."""
    waited = time.perf_counter()
    if par.pipeline:
        batch = batches.next_batch()
        waited = time.perf_counter() - waited
        return plugins.run_pipeline(par, model, optimizer, inputs(_to_device(batch))), _tokens_in(batch), waited
    total_loss, tokens, data_seconds = None, 0, 0.0
    for micro_step in range(accumulation_steps):
        waited = time.perf_counter()
        batch = batches.next_batch()
        data_seconds += time.perf_counter() - waited
        tokens += _tokens_in(batch)
        is_last = micro_step == accumulation_steps - 1
        with plugins.no_sync_context(par, model, optimizer, is_last):
            with plugins.forward_context(par):
                loss = model(**inputs(_to_device(batch))).loss / accumulation_steps
            plugins.backward(par, loss, optimizer)
        total_loss = loss.detach() if total_loss is None else total_loss + loss.detach()
    return total_loss, tokens, data_seconds


def build_boosted(
    cfg: TrainConfig,
    par: plugins.Parallelism,
    model_config,
    attn_implementation: str,
    warmup_steps: int,
    total_steps: int,
):
    """The model, optimizer and lr schedule, boosted by the plugin. Returns (model, optimizer, lr_scheduler)."""
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    with plugins.model_init_context(par):
        # par.weight_dtype: no fp32 master copy may exist, so the weights themselves are 16-bit
        model = build_model(model_config, attn_implementation, par.weight_dtype)
    if cfg.grad_checkpoint:
        model.gradient_checkpointing_enable()
    optimizer = build_optimizer(
        par.optimizer,
        model,
        cfg.lr,
        cfg.weight_decay,
        beta2=cfg.beta2,
        max_norm=cfg.grad_clip,
        fp16_loss_scaling=par.precision == "fp16",
        process_group=dist.group.WORLD if par.dp_size > 1 else None,
        reference_multiply=cfg.collage_reference_multiply,
        monitor=cfg.log_edq,
    )
    lr_scheduler = build_lr_scheduler(optimizer, warmup_steps, total_steps)
    if par.fused_update:
        plugins.keep_ddp_buckets_small(model)
    model, optimizer, _, _, lr_scheduler = par.booster.boost(model, optimizer, lr_scheduler=lr_scheduler)
    return model, optimizer, lr_scheduler


def fit(
    cfg: TrainConfig,
    par: plugins.Parallelism,
    model_config,
    batches,
    total_steps: int,
    warmup_steps: int,
    tokenizer,
    seq_len: int,
    initial_weights: str | None = None,
    desc: str = "training",
    held_out: list[dict] | None = None,
) -> dict:
    main = plugins.is_main_process()

    def say(message: str) -> None:
        if main:
            print(message, flush=True)

    attn_implementation, attn_message = select_attention(cfg.flash_attention)
    if attn_message:
        say(attn_message)
    if cfg.document_attention:
        say(f"attention confined to documents ({attn_implementation})")
    say(
        f"model: {count_parameters(model_config) / 1e6:,.1f}M parameters; plugin {cfg.plugin} ({par.precision}), "
        f"optimizer {par.optimizer}, {dist.get_world_size()} processes, {par.dp_size} data-parallel replicas; "
        f"{total_steps} steps"
    )
    if warmup_steps >= total_steps:
        say(f"note: {warmup_steps} warmup steps >= {total_steps} total steps, so the lr never reaches its peak")
    model, optimizer, lr_scheduler = build_boosted(
        cfg, par, model_config, attn_implementation, warmup_steps, total_steps
    )

    layout = dict(
        plugin=cfg.plugin, world_size=dist.get_world_size(), dp_size=par.dp_size, tp=cfg.tp, pp=cfg.pp,
        zero_stage=cfg.zero_stage,
    )  # fmt: skip
    state = TrainState()
    if cfg.load:
        started = time.perf_counter()
        running_states, data_state = load_checkpoint(par, model, optimizer, lr_scheduler, cfg.load, layout)
        state = TrainState(
            running_states["step"], running_states["consumed_samples"], running_states["consumed_tokens"]
        )
        if data_state is not None:
            batches.load_state_dict(data_state)
            say(
                f"resumed from {cfg.load} at step {state.step} (epoch {batches.epoch}, "
                f"{state.consumed_tokens:,} tokens seen) in {time.perf_counter() - started:.1f}s"
            )
        else:
            say(
                f"{cfg.load} was saved with {describe_layout(running_states.get('layout', {'plugin': '?', 'world_size': '?'}))}; "
                f"this run uses {describe_layout(layout)}: loaded the model weights and the schedule position "
                f"(step {state.step}). Optimizer state and data position cannot be resharded across layouts: "
                "the optimizer starts fresh and the data stream restarts from its beginning"
            )
    elif initial_weights:
        par.booster.load_model(model, initial_weights)
        say(f"loaded weights from {initial_weights}")
    if state.step >= total_steps:
        say(f"nothing to train: the checkpoint is at step {state.step} and this run stops at {total_steps}")

    samples_per_step = cfg.batch_size * cfg.accumulation_steps * par.dp_size
    logger = MetricsLogger(main, cfg.tensorboard_dir, total_steps, state.step, desc=desc)
    last_checkpoint, losses, step_seconds, step_tokens, step_parts = None, [], [], [], []
    flops_per_token = training_flops_per_token(model_config, seq_len)
    peak_flops, peak_source = peak_flops_per_device()
    say(f"MFU against {peak_flops / 1e12:,.3f} TFLOP/s per device ({peak_source}); {MFU_FORMULA}")

    def checkpoint() -> str:
        running_states = dict(
            step=state.step,
            epoch=batches.epoch,
            consumed_samples=state.consumed_samples,
            consumed_tokens=state.consumed_tokens,
            world_size=dist.get_world_size(),
            dp_size=par.dp_size,
            layout=layout,
            config=cfg.to_dict(),
        )
        path, seconds, size = save_checkpoint(
            par,
            model,
            optimizer,
            lr_scheduler,
            cfg.save_dir,
            running_states,
            batches.state_dict(),
            tokenizer,
            cfg.keep_last,
        )
        logger.print(f"saved checkpoint {path} ({size / 2**20:,.1f} MB) in {seconds:.1f}s")
        return str(path)

    mask_dtype = next(model.parameters()).dtype  # the document mask is added to scores in the model's dtype

    def inputs(batch: dict) -> dict:
        return model_inputs(batch, attn_implementation, cfg.document_attention, mask_dtype)

    def evaluate() -> None:
        """Loss and perplexity on the held-out batches, weighted by their completion tokens."""
        model.eval()
        loss_sum = torch.zeros((), device=plugins.device())
        tokens = 0
        with torch.no_grad():
            for batch in held_out:
                n = int((batch["labels"][:, 1:] != -100).sum())  # the tokens the loss averages over
                if par.pipeline:
                    loss = plugins.run_pipeline(par, model, None, inputs(_to_device(batch)))
                else:
                    with plugins.forward_context(par):
                        loss = model(**inputs(_to_device(batch))).loss
                if loss is not None:
                    loss_sum += loss.float() * n
                tokens += n
        model.train()
        loss_mean, tokens_mean = plugins.mean_across_replicas(par, loss_sum, tokens)
        eval_loss = loss_mean / max(tokens_mean, 1e-9)
        summary_evals.append((state.step, eval_loss))
        logger.print(
            f"held-out loss {eval_loss:.4f}, perplexity {math.exp(min(eval_loss, 50)):,.2f} at step {state.step}"
        )
        logger.log_eval(state.step, eval_loss, math.exp(min(eval_loss, 50)))

    summary_evals: list[tuple[int, float]] = []
    if held_out and state.step == 0:
        evaluate()  # the starting point, so the run shows what training changed
    stop = StopRequest()
    model.train()
    reset_peak_memory()
    while state.step < total_steps:
        started = time.perf_counter()
        lr = lr_scheduler.get_last_lr()[0]
        local_loss, local_tokens, data_seconds = train_step(
            par, model, optimizer, batches, cfg.accumulation_steps, inputs
        )
        if cfg.time_breakdown:  # so the clock measures work done, not work queued on a GPU
            plugins.synchronize()
        backward_done = time.perf_counter()
        grad_norm = plugins.step_optimizer(par, optimizer, cfg.grad_clip)
        lr_scheduler.step()
        optimizer.zero_grad()
        if cfg.time_breakdown:  # only when asked: a sync each step would stall the CPU behind the GPU
            plugins.synchronize()
        optimizer_done = time.perf_counter()
        # one all-reduce, and a sync point: the step is done on every rank
        loss, tokens_mean = plugins.mean_across_replicas(par, local_loss, local_tokens)
        tokens = round(tokens_mean * par.dp_size)
        elapsed = time.perf_counter() - started

        state.step += 1
        state.consumed_samples += samples_per_step
        state.consumed_tokens += tokens
        if not math.isfinite(loss):
            raise RuntimeError(
                f"loss is {loss} at step {state.step}; lower --lr or raise the warmup, "
                f"and resume from the last good checkpoint ({last_checkpoint or 'none saved yet'})"
            )
        losses.append(loss)
        step_seconds.append(elapsed)
        step_tokens.append(tokens)
        step_parts.append(
            dict(
                data=data_seconds,
                forward_backward=backward_done - started - data_seconds,
                optimizer=optimizer_done - backward_done,
                other=elapsed - (optimizer_done - started),
            )
        )
        write = state.step % cfg.log_interval == 0 or state.step == total_steps
        mfu = model_flops_utilization(tokens / elapsed, flops_per_token, dist.get_world_size(), peak_flops)
        logger.log_step(state.step, loss, lr, grad_norm, tokens / elapsed, mfu, write)
        if cfg.log_edq and write:
            edq = edq_metrics(plugins.optimizer_metric_sums(optimizer))
            logger.log_scalars(state.step, {f"optimizer/{name}": value for name, value in edq.items()})
        if par.fused_update and plugins.unwrap_optimizer(optimizer).skipped:
            logger.print(f"fp16 gradients overflowed at step {state.step}: update skipped, loss scale lowered")
        if cfg.save_dir and cfg.save_interval > 0 and state.step % cfg.save_interval == 0:
            last_checkpoint = checkpoint()
        if held_out and cfg.eval_interval > 0 and state.step % cfg.eval_interval == 0:
            evaluate()
        if stop.agreed():
            logger.print(f"{stop.signal_name} received: stopping at the end of step {state.step}")
            break
    if cfg.save_dir and losses and (last_checkpoint is None or not last_checkpoint.endswith(f"step-{state.step}")):
        last_checkpoint = checkpoint()
    stop.restore()
    if held_out and losses and (not summary_evals or summary_evals[-1][0] != state.step):
        evaluate()
    loss_plot = logger.close()
    if cfg.export_hf and last_checkpoint and plugins.is_main_process():
        from .export import export_hf

        export_hf(last_checkpoint, cfg.export_hf)
        say(f"exported a Hugging Face model to {cfg.export_hf}")

    # The first step includes one-off work (allocations, kernel selection); leave it out of the rate.
    timed = slice(1, None) if len(losses) > 1 else slice(None)
    tokens_per_s = sum(step_tokens[timed]) / sum(step_seconds[timed]) if losses else None
    summary = dict(
        steps=state.step,
        steps_this_run=len(losses),
        first_loss=losses[0] if losses else None,
        final_loss=losses[-1] if losses else None,
        tokens_per_s=tokens_per_s,
        step_tokens=step_tokens,
        step_seconds=step_seconds,
        step_parts=step_parts,
        flops_per_token=flops_per_token,
        peak_flops=peak_flops,
        peak_source=peak_source,
        losses=losses,
        peak_memory_mb=peak_memory_mb(),
        world_size=dist.get_world_size(),
        dp_size=par.dp_size,
        precision=par.precision,
        optimizer=par.optimizer,
        checkpoint=last_checkpoint,
        tensorboard_dir=cfg.tensorboard_dir,
        evals=summary_evals,
    )
    if losses:
        tb_hint = f"  (tensorboard --logdir {cfg.tensorboard_dir})" if cfg.tensorboard_dir else ""
        say(
            f"done: {len(losses)} steps this run (step {state.step} of {total_steps}), "
            f"loss {losses[0]:.4f} -> {losses[-1]:.4f} (mean of the last {len(losses[-10:])}: "
            f"{sum(losses[-10:]) / len(losses[-10:]):.4f}), {tokens_per_s:,.0f} tokens/s, "
            f"peak memory {summary['peak_memory_mb']:,.0f} MB on rank 0\n"
            f"checkpoint: {last_checkpoint or 'none (no -o/--save_dir)'}\n"
            f"tensorboard: {cfg.tensorboard_dir or 'disabled'}{tb_hint}"
            + (f"\nloss curve: {loss_plot}" if loss_plot else "")
        )
    return summary


def pretrain_steps_for_epochs(cfg: TrainConfig, tokenizer, par: plugins.Parallelism, seq_len: int) -> int:
    """Optimizer steps in `-e` epochs, from a token count of the data (the replica with the least data decides)."""
    tokens = count_tokens(cfg.dataset, tokenizer, par.dp_rank, par.dp_size, progress=plugins.is_main_process())
    steps_per_epoch = plugins.fewest_across_ranks(tokens // seq_len // (cfg.batch_size * cfg.accumulation_steps))
    if steps_per_epoch == 0:
        raise UsageError(
            f"the data holds fewer than {seq_len * cfg.batch_size * cfg.accumulation_steps} tokens per replica, "
            "not enough for one step; lower -b/-l/--accumulation_steps or add data"
        )
    return steps_per_epoch * cfg.num_epochs


def pretrain(cfg: TrainConfig) -> dict:
    """Pretrain a randomly initialised model on packed text."""
    plugins.launch(cfg.seed)
    par = plugins.build_parallelism(cfg)
    model_config = get_model_config(cfg.config)
    tokenizer = load_tokenizer(cfg.tokenizer or str(SHIPPED_TOKENIZER))
    if len(tokenizer) > model_config.vocab_size:
        raise UsageError(
            f"the tokenizer has {len(tokenizer)} tokens but the model {model_config.vocab_size}; match -c and --tokenizer"
        )
    seq_len = cfg.max_length or model_config.max_position_embeddings
    steps_per_epoch = None
    if cfg.dataset == SYNTHETIC:
        if not cfg.max_steps:
            raise UsageError("-d synthetic has no epochs; pass --max_steps")
        batches = SyntheticBatches(model_config.vocab_size, seq_len, cfg.batch_size, seed=cfg.seed + par.dp_rank)
    elif is_prepared_dataset(cfg.dataset):
        check_prepared_tokenizer(cfg.dataset, tokenizer)
        batches = PreparedBatches(cfg.dataset, seq_len, cfg.batch_size, par.dp_rank, par.dp_size)
        steps_per_epoch = batches.rows_per_replica // (cfg.batch_size * cfg.accumulation_steps)
    else:
        batches = build_pretrain_batches(
            cfg.dataset, tokenizer, seq_len, cfg.batch_size, par.dp_rank, par.dp_size, cfg.data_mix
        )
    if cfg.max_steps:
        total_steps = cfg.max_steps
    elif steps_per_epoch is not None:
        total_steps = steps_per_epoch * cfg.num_epochs
    else:
        total_steps = pretrain_steps_for_epochs(cfg, tokenizer, par, seq_len)
    if total_steps == 0:
        raise UsageError("the data is too small for one step; lower -b/-l/--accumulation_steps or add data")
    batches = Prefetcher(batches)
    try:
        summary = fit(
            cfg, par, model_config, batches, total_steps, cfg.warmup_steps, tokenizer, seq_len, desc="pretraining"
        )
    finally:
        batches.close()
    if SKIPPED:
        details = ", ".join(f"{n} {reason}" for reason, n in SKIPPED.items())
        print(
            f"warning (rank {dist.get_rank()}): skipped {sum(SKIPPED.values())} unusable data lines while training "
            f"({details}; a line read in several epochs counts each time)"
        )
    return summary


def finetune(cfg: TrainConfig) -> dict:
    """Finetune pretrained weights on prompt/completion pairs, with the loss on completions only."""
    plugins.launch(cfg.seed)
    par = plugins.build_parallelism(cfg)
    model_dir = resolve_pretrained(cfg.model_path)
    model_config = get_model_config(str(model_dir))
    tokenizer = load_model_tokenizer(model_dir, cfg.tokenizer)
    max_length = cfg.max_length or model_config.max_position_embeddings
    rows, held_out_rows = split_held_out(load_instruction_rows(cfg.dataset, cfg.task_name), cfg.eval_split, cfg.seed)
    batches = InstructionBatches(
        rows, tokenizer, max_length, cfg.batch_size, par.dp_rank, par.dp_size, cfg.seed,
        pad_to_max_length=par.pipeline, pack=cfg.pack_examples,
    )  # fmt: skip
    held_out = held_out_batches(
        held_out_rows, tokenizer, max_length, cfg.batch_size, par.dp_rank, par.dp_size, pad_to_max_length=par.pipeline
    )
    total_steps = cfg.max_steps
    if not total_steps:
        # packed rows differ per replica; all must run the same steps
        total_steps = plugins.fewest_across_ranks(batches.steps_per_epoch // cfg.accumulation_steps) * cfg.num_epochs
    if total_steps == 0:
        raise UsageError("the dataset is too small for one step; lower -b or --accumulation_steps")
    warmup_steps = math.ceil(cfg.warmup_ratio * total_steps)
    if plugins.is_main_process():
        print(
            f"finetuning on {len(rows):,} examples of {cfg.dataset} ({cfg.task_name}), {len(held_out_rows)} held out, "
            f"{max_length} tokens max" + (", several examples per row (--pack_examples)" if cfg.pack_examples else "")
        )
    summary = fit(
        cfg, par, model_config, batches, total_steps, warmup_steps, tokenizer, max_length,
        weights_location(model_dir), "finetuning", held_out=held_out,
    )  # fmt: skip
    if plugins.is_main_process() and summary["checkpoint"] and held_out_rows:
        # Show what finetuning did: the model's greedy answers to a few held-out prompts.
        prompts = [r["prompt"] for r in held_out_rows[:3]]
        answers = generate_answers(f"{summary['checkpoint']}/model", tokenizer, prompts)
        summary["generations"] = list(zip(prompts, answers, strict=True))
        for prompt, answer in summary["generations"]:
            print(f"--- held-out prompt:\n{prompt.strip()}\n--- model answer:\n{answer}")
        if cfg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            with SummaryWriter(cfg.tensorboard_dir) as writer:
                for i, (prompt, answer) in enumerate(summary["generations"]):
                    writer.add_text(
                        f"generation/{i}", f"**prompt**: {prompt}\n\n**answer**: {answer}", summary["steps"]
                    )
    if batches.truncated and plugins.is_main_process():
        print(f"note: {batches.truncated} examples on rank 0 were longer than -l {max_length}; their prompts were cut")
    return summary
