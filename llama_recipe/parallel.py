"""The layout a run trains in (`Parallelism`), and the few things that differ between plugins in a
training step: model init, autocast, skipping gradient sync while accumulating, backward, the
optimizer step with its gradient norm, pipeline execution, and means over data-parallel replicas.

Every difference is read from the plugin's `PluginSpec` (plugins.py), never from its name.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .colossalai_patches import compress_pipeline_backward, route_pipeline_dp_grad_sync
from .compression import BackpropCompression, Communication, CompressionSettings, PowerSGD
from .config import CompressionConfig, TrainConfig
from .distributed import device, print_main
from .loss import target_tokens, token_weighted
from .optim import OPTIMIZERS
from .plugins import PluginSpec, check_layout, create_plugin, plugin_spec, resolve_optimizer, resolve_precision


@dataclass
class Parallelism:
    """What the training loop needs to know about the layout it runs in."""

    booster: object
    plugin: object
    spec: PluginSpec
    precision: str
    optimizer: str
    dp_rank: int
    dp_size: int
    max_norm: float = 0.0  # --grad_clip: given to the plugin at build, used by `step` and in-place SGD
    dp_group: object | None = None  # None: the whole world
    pp_group: object | None = None  # None: no pipeline
    compression: CompressionConfig | None = None  # --grad_compression powersgd (None: exact all-reduce)
    compressor: PowerSGD | None = None  # its DDP communication hook, once the model is boosted
    sequence_parallel: bool = False  # --sp_mode: shardformer computes attention itself
    tp_group: object | None = None  # None: no tensor parallelism
    backprop_rank: int | None = None  # --compress_backprop R (None: pipeline gradients sent exact)
    backprop_epilogue_only: bool = False  # --compress_backprop_epilogue_only
    backprop: BackpropCompression | None = None  # its codec, wrapped around the 1F1B schedule by `boost`
    lora: bool = False  # --lora_rank: the model trains adapters only, and checkpoints hold only them (lora.py)

    @staticmethod
    def is_sharded(param: torch.Tensor) -> bool:
        """Whether tensor parallelism split this (boosted) parameter over the TP group; the others are replicated."""
        from colossalai.tensor.d_tensor import is_distributed_tensor

        return is_distributed_tensor(param)

    def attention_implementation(self, chosen: str) -> str:
        """The transformers attention the model is built with, given the kernel `select_attention` chose.
        Under sequence parallelism without flash attention, shardformer (0.5.0) computes
        softmax(QK^T + mask)V itself with the mask transformers prepared; for SDPA transformers leaves
        the causal mask out when nothing is padded (SDPA would apply it), so every token would see the
        future. With "eager" transformers builds the causal mask that path needs."""
        return "eager" if self.sequence_parallel and chosen == "sdpa" else chosen

    @property
    def pipeline(self) -> bool:
        return self.pp_group is not None

    @property
    def is_last_pipeline_stage(self) -> bool:
        """Where the pipeline computes the loss: the last stage, or with zbv's V-shaped schedule, whose last
        model chunk lives on the first stage, the first one (whichever chunk is running now)."""
        if not self.pipeline:
            return True
        stages = self.plugin.stage_manager
        return stages.is_first_stage(ignore_chunk=True) if stages.use_zbv else stages.is_last_stage(ignore_chunk=True)

    @property
    def fused_update(self) -> bool:
        """The optimizer updates the weights during backward (inplace_sgd)."""
        return OPTIMIZERS[self.optimizer].fused_update

    @property
    def weight_dtype(self) -> torch.dtype | None:
        """The dtype the model is built in when no fp32 master copy may exist: pure bf16, and fp16 with
        inplace_sgd (LOMO's fp16 weights with dynamic loss scaling). None: fp32, and the plugin decides."""
        if self.precision == "pure_bf16":
            return torch.bfloat16
        if self.precision == "fp16" and self.fused_update:
            return torch.float16
        return None

    @property
    def builds_lazily(self) -> bool:
        """Gemini and hybrid_parallel can materialise weights lazily, shard by shard, so a 70B model
        never sits whole in one process. (LazyInit with LowLevelZero hits a RecursionError in 0.5.0.)
        Not for 16-bit weights without masters: lazy tensors materialise in fp32 whatever dtype they
        were built in, so those models are built whole, directly in bf16/fp16, then sharded."""
        return self.spec.lazy_init and self.weight_dtype is None

    def model_init_context(self):
        """Where the model is built: lazily (`builds_lazily`) with this rank's device as the one its weights
        materialise on, else eagerly on the CPU (the plugin moves it)."""
        if self.builds_lazily:
            from colossalai.lazy import LazyInitContext

            return LazyInitContext(default_device=device())
        return contextlib.nullcontext()

    def boost(self, model: torch.nn.Module, optimizer, lr_scheduler, total_steps: int = 0, seed: int = 0):
        """Wrap model, optimizer and schedule in the plugin's machinery; with --grad_compression, register
        the compression hook on the DDP inside (`total_steps` sizes its warm-up); with --compress_backprop,
        wrap its codec around the pipeline schedule; for inplace_sgd, attach the optimizer's hooks."""
        if self.fused_update:
            _keep_ddp_buckets_small(model)
        model, optimizer, _, _, lr_scheduler = self.booster.boost(model, optimizer, lr_scheduler=lr_scheduler)
        if self.compression is not None:
            self.compressor = _register_powersgd(self, model, total_steps, seed)
        if self.fused_update:
            unwrap_optimizer(optimizer).attach_hooks()  # the plugin built the parameters it holds now
        if self.backprop_rank:
            stage = self.plugin.stage_manager.stage
            self.backprop = BackpropCompression(self.backprop_rank, seed, index=int(stage))
            compress_pipeline_backward(self.plugin.scheduler, self.backprop, self.backprop_epilogue_only)
            print_main(
                f"compressed backpropagation: rank {self.backprop_rank} factors between pipeline stages, lazy error "
                f"propagation{', flush sends only' if self.backprop_epilogue_only else ''}"
            )
        return model, optimizer, lr_scheduler

    def take_communication(self) -> Communication | None:
        """What the gradient sync (--grad_compression) and the pipeline's backward sends
        (--compress_backprop: summed over this replica's pipeline stages, one small all-reduce) sent
        this step; None without either."""
        if self.compressor is None and self.backprop is None:
            return None
        comm = self.compressor.take() if self.compressor else Communication()
        if self.backprop is not None:
            counts = self.backprop.take()
            mine = [counts.bytes_sent, counts.bytes_uncompressed, counts.messages, counts.compressed, counts.seconds]
            comm.pp_backward_bytes_sent, comm.pp_backward_bytes_uncompressed = mine[:2]
            pipeline = torch.tensor(mine, dtype=torch.float64, device=device())  # NCCL reduces device tensors
            dist.all_reduce(pipeline, group=self.pp_group)
            comm.pipeline_backward = [int(v) for v in pipeline[:4].tolist()] + [float(pipeline[4])]
        return comm

    def compression_state(self) -> dict[str, torch.Tensor]:
        """This rank's compression state, for its checkpoint file."""
        state = self.compressor.state_dict() if self.compressor else {}
        if self.backprop is not None:
            state |= {f"backprop/{k}": v for k, v in self.backprop.state_dict().items()}
        return state

    def load_compression_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.compressor is not None:
            self.compressor.load_state_dict({k: v for k, v in state.items() if not k.startswith("backprop/")})
        if self.backprop is not None:
            self.backprop.load_state_dict(
                {k.removeprefix("backprop/"): v for k, v in state.items() if k.startswith("backprop/")}
            )

    def restart_compression(self, step: int) -> None:
        if self.compressor is not None:
            self.compressor.restart(step)
        if self.backprop is not None:
            self.backprop.restart()

    @property
    def compresses(self) -> bool:
        return self.compressor is not None or self.backprop is not None

    def forward_context(self):
        """bf16 autocast where the plugin leaves precision alone (ddp); the others cast the model themselves."""
        if self.spec.autocast_bf16 and self.precision == "bf16":
            return torch.autocast(device_type=device().type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def no_sync(self, model, optimizer, is_last_micro_step: bool):
        """Skip the gradient all-reduce on accumulation micro-steps where the plugin allows it.
        (ZeRO-2 reduce-scatters every micro-step by design; it still accumulates correctly.)
        inplace_sgd always runs outside DDP's reducer: it all-reduces each gradient itself, in its hook."""
        if self.fused_update and dist.get_world_size() > 1:
            return self.booster.no_sync(model, optimizer)
        if is_last_micro_step or self.spec.syncs_every_micro_step or not self.plugin.support_no_sync():
            return contextlib.nullcontext()
        return self.booster.no_sync(model, optimizer)

    def backward(self, loss: torch.Tensor, optimizer) -> None:
        if self.fused_update:
            unwrap_optimizer(optimizer).fused_backward(loss)  # backward and update, parameter by parameter
        else:
            self.booster.backward(loss, optimizer)

    def step(self, optimizer) -> float | None:
        """Clip, step, and return the global gradient norm (before clipping) where it is known.

        ColossalAI's optimizer wrappers clip inside `step()` (the plugin got max_norm) and remember
        the norm; torch DDP's does neither, so we clip here, and skip the update when the norm is not
        finite. inplace_sgd already clipped and stepped inside its backward pass.
        """
        if self.fused_update:
            return unwrap_optimizer(optimizer).last_grad_norm
        if not self.spec.clips_in_step:
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            norm = gradient_norm(params)
            if self.max_norm > 0 and math.isfinite(norm):
                torch.nn.utils.clip_grads_with_norm_(params, self.max_norm, torch.tensor(norm))
            if math.isfinite(norm):
                optimizer.step()
            return norm
        optimizer.step()
        norm = optimizer.get_grad_norm()
        return None if norm is None else float(norm)

    def run_pipeline(
        self, model, optimizer, batch: dict, tokens_per_replica: float | None = None
    ) -> torch.Tensor | None:
        """One forward (and, with an optimizer, backward) of a pipelined batch: the loss on the last
        stage, None elsewhere. Without `tokens_per_replica`, the mean of the micro-batches' mean losses
        (ColossalAI's schedule divides each by their number); with it (training), each micro-batch's
        loss is first weighted by its target tokens (`token_weighted`), so the step's loss is the mean
        over every target token of the batch, whatever the micro-batch size."""

        def criterion(out, micro_batch: dict) -> torch.Tensor:
            if tokens_per_replica is None:
                return out.loss
            # every schedule divides what this returns by the number of micro-batches (-b must divide by it)
            microbatches = len(batch["labels"]) // len(micro_batch["labels"])
            return token_weighted(out.loss, target_tokens(micro_batch["labels"]), tokens_per_replica / microbatches)

        outputs = self.booster.execute_pipeline(
            iter([batch]), model, criterion=criterion, optimizer=optimizer, return_loss=True
        )
        return outputs["loss"] if self.is_last_pipeline_stage else None

    def tokens_per_replica(self, local_tokens: int) -> float:
        """The target tokens of this step over all replicas (one all-reduce over the data-parallel
        group), divided by the replica count: what `token_weighted` divides each micro-batch's token
        losses by, so that the plugin's average of the replicas' gradients is the gradient of the
        mean over every target token of the global batch. Summed in float64: exact to 2^53."""
        if self.dp_size == 1:
            return float(local_tokens)
        count = torch.tensor(float(local_tokens), dtype=torch.float64, device=device())
        dist.all_reduce(count, group=self.dp_group)
        return float(count) / self.dp_size

    def mean_across_replicas(self, *values: torch.Tensor | float | None) -> list[float]:
        """Average per-rank numbers over data-parallel replicas, in one all-reduce, so every rank sees
        the same numbers. With a pipeline only the numbers of the stage that computes the loss count
        (`is_last_pipeline_stage`; the others have no loss: pass None): they are zeroed elsewhere, and the
        sum over the pipeline group copies them to every stage."""
        t = torch.stack(
            [
                torch.as_tensor(0.0 if v is None else v, dtype=torch.float32).detach().to(device()).reshape(())
                for v in values
            ]
        )
        if not self.is_last_pipeline_stage:
            t.zero_()
        if self.pipeline:
            dist.all_reduce(t, group=self.pp_group)
        dist.all_reduce(t, group=self.dp_group)
        return (t / self.dp_size).tolist()


def gradient_norm(params: list[torch.Tensor]) -> float:
    """The global L2 norm of these parameters' gradients, each tensor's accumulated in float64 as
    ColossalAI's optimizers do (`grad.double().norm()`), so every plugin reports the same number:
    torch's float32 norm of one large gradient on CPU is off by up to 1e-4 (`tiny`'s 2M-element LM
    head: 8e-5 low), enough to tell ddp's norm from ZeRO's. One tensor at a time is cast."""
    norms = [torch.linalg.vector_norm(p.grad, dtype=torch.float64) for p in params]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def build_parallelism(cfg: TrainConfig) -> Parallelism:
    """The plugin and Booster for `cfg`, and this rank's place in the layout. Needs the process group."""
    check_layout(cfg, dist.get_world_size())
    spec = plugin_spec(cfg.parallel.plugin)
    precision, optimizer = resolve_precision(cfg), resolve_optimizer(cfg)
    plugin, booster_precision = create_plugin(cfg, precision)
    if spec.uses_booster:
        from colossalai.booster import Booster

        booster = Booster(plugin=plugin, mixed_precision=booster_precision)
    else:
        booster = plugin
    dp_group = plugin.dp_group if spec.model_parallel else None
    pp_group = plugin.pp_group if spec.model_parallel and cfg.parallel.pp > 1 else None
    return Parallelism(
        booster=booster,
        plugin=plugin,
        spec=spec,
        precision=precision,
        optimizer=optimizer,
        dp_rank=dist.get_rank(dp_group),
        dp_size=dist.get_world_size(dp_group),
        max_norm=cfg.optim.grad_clip,
        dp_group=dp_group,
        pp_group=pp_group,
        compression=cfg.compression if cfg.compression.grad_compression != "none" else None,
        sequence_parallel=spec.model_parallel and cfg.parallel.sp_mode is not None,
        tp_group=plugin.tp_group if spec.model_parallel and cfg.parallel.tp > 1 else None,
        backprop_rank=cfg.compression.compress_backprop,
        backprop_epilogue_only=cfg.compression.compress_backprop_epilogue_only,
        lora=cfg.model.lora_rank is not None,
    )


def unwrap_optimizer(optimizer):
    """Our optimizer inside the booster's wrapper (ColossalAI's wrappers hand it back from `unwrap()`)."""
    return optimizer.unwrap() if hasattr(optimizer, "unwrap") else optimizer


def _keep_ddp_buckets_small(model: torch.nn.Module) -> None:
    """For inplace_sgd under torch DDP. DDP allocates gradient buckets as large as the model when it
    wraps it, which is the memory in-place SGD exists to avoid, and our optimizer's hooks all-reduce
    each gradient themselves (DDP only runs in no_sync). So DDP is told to ignore every parameter
    but the smallest (it refuses a model with nothing to synchronise). Call before wrapping."""
    names = [name for name, _ in model.named_parameters()]
    smallest = min(model.named_parameters(), key=lambda item: item[1].numel())[0]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, [n for n in names if n != smallest])


def _register_powersgd(par: Parallelism, model, total_steps: int, seed: int) -> PowerSGD:
    """PowerSGD on the data-parallel gradients, registered before the first step: the communication
    hook of the torch DDP inside the boosted model (TorchDDPPlugin's, or HybridParallelPlugin's with
    pp = 1), or, with a pipeline, its data-parallel sync (a ColossalAI patch). plugins.py refuses
    the rest. Its state is keyed by parameter name (see compression.py)."""
    cfg = par.compression
    warmup = max(2, math.ceil(cfg.powersgd_warmup * total_steps))
    stage = par.plugin.stage_manager.stage if par.pipeline else 0
    exact_stage = bool(cfg.compress_stages) and stage >= cfg.compress_stages  # --compress_stages: counted, exact
    settings = CompressionSettings(
        rank=cfg.powersgd_rank,
        warmup_steps=sys.maxsize if exact_stage else warmup,
        error_feedback=not cfg.powersgd_no_error_feedback,
        seed=seed,
        log_cosine=cfg.powersgd_log_cosine,
    )
    ddp = getattr(model, "module", None)
    inner = ddp.module if isinstance(ddp, DistributedDataParallel) else model.module
    params = [(name, p) for name, p in inner.named_parameters() if p.requires_grad]
    group = ddp.process_group if isinstance(ddp, DistributedDataParallel) else par.dp_group
    compressor = PowerSGD(settings, {p.data_ptr(): name for name, p in params}, group)
    if isinstance(ddp, DistributedDataParallel):
        ddp.register_comm_hook(None, compressor.hook)
    else:

        def sync_dp_grads() -> None:  # what HybridParallelModule.sync_dp_grads does, through the compressor
            if par.dp_size > 1:
                compressor.sync_step([(name, p.grad) for name, p in params if p.grad is not None])

        route_pipeline_dp_grad_sync(model, sync_dp_grads)
    print_main(
        f"PowerSGD rank {settings.rank} on the data-parallel gradients, error feedback "
        f"{'on' if settings.error_feedback else 'off'}, after {warmup} exact steps"
        + (f"; pipeline stages {cfg.compress_stages} and later stay exact" if cfg.compress_stages else "")
    )
    return compressor
