"""Everything ColossalAI-specific: process launch, booster plugins, and the few places where the
plugins differ (data-parallel groups, pipeline execution, gradient norms, mixed precision).

The training loop asks this module questions ("which data-parallel rank am I?", "step the
optimizer and tell me the gradient norm") instead of checking plugin types itself.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import TrainConfig, UsageError

PLUGIN_NAMES = ["gemini", "gemini_auto", "zero2", "zero2_cpu", "hybrid_parallel", "ddp"]
BASELINE = "none"  # benchmark.py only: plain PyTorch, no booster, to measure the plugins' overhead against
GPU_ONLY_PLUGINS = ["gemini", "gemini_auto"]
CPU_PLUGINS = [p for p in PLUGIN_NAMES if p not in GPU_ONLY_PLUGINS]
FP16_INITIAL_LOSS_SCALE = 2**16


def has_cuda() -> bool:
    return torch.cuda.is_available()


COLLAGE_OPTIMIZERS = ["collage_light", "collage_plus"]  # bf16 weights + error terms, no fp32 masters
FUSED_OPTIMIZERS = ["inplace_sgd"]  # the update happens inside the backward pass


def resolve_optimizer_name(cfg: TrainConfig) -> str:
    """Gemini only works with ColossalAI's HybridAdam; everything else defaults to torch AdamW."""
    return cfg.optimizer or ("hybrid_adam" if cfg.plugin in GPU_ONLY_PLUGINS else "adamw")


def resolve_precision(cfg: TrainConfig) -> str:
    """bf16 on GPUs; fp32 on CPUs, where bf16 matrix products run about 100x slower than fp32;
    pure bf16 for Collage, whose whole point is having no fp32 copy of anything."""
    if cfg.mixed_precision:
        return cfg.mixed_precision
    if resolve_optimizer_name(cfg) in COLLAGE_OPTIMIZERS:
        return "pure_bf16"
    return "bf16" if has_cuda() else "fp32"


def check_optimizer_precision(cfg: TrainConfig, precision: str) -> None:
    """The optimizer/precision/plugin combinations that cannot work, as one-line errors."""
    plugin, optimizer = cfg.plugin, resolve_optimizer_name(cfg)
    if optimizer in COLLAGE_OPTIMIZERS and precision != "pure_bf16":
        raise UsageError(
            f"--optimizer {optimizer} keeps bf16 weights plus bf16 error terms instead of fp32 master weights; "
            f"drop -x {precision} (or pass -x pure_bf16)"
        )
    if precision == "pure_bf16":
        if plugin in GPU_ONLY_PLUGINS:
            raise UsageError(
                f"-p {plugin} always keeps fp32 master chunks and needs HybridAdam, so it cannot train pure bf16 "
                "(-x pure_bf16 / --optimizer collage_*); use -p zero2, zero2_cpu, ddp or hybrid_parallel"
            )
        if optimizer == "hybrid_adam":
            raise UsageError(
                "HybridAdam keeps fp32 optimizer states; with -x pure_bf16 use --optimizer adamw or collage_*"
            )
        if plugin == "hybrid_parallel" and cfg.zero_stage > 0:
            raise UsageError(
                "-x pure_bf16 under -p hybrid_parallel needs --zero_stage 0: ColossalAI 0.5.0's ZeRO there always "
                "makes fp32 master copies; for ZeRO-sharded pure bf16 use -p zero2"
            )
    if optimizer in FUSED_OPTIMIZERS:
        if plugin not in ("ddp", BASELINE):
            raise UsageError(
                f"--optimizer {optimizer} updates each weight inside the backward pass, which needs whole gradients in "
                f"every process; use -p ddp (one process, or data parallel), not -p {plugin}"
            )
        if cfg.accumulation_steps > 1:
            raise UsageError(
                f"--optimizer {optimizer} applies the update during the backward pass, so gradients cannot "
                "accumulate; drop --accumulation_steps and raise -b instead"
            )
    if cfg.log_edq and optimizer not in COLLAGE_OPTIMIZERS:
        raise UsageError(
            "--log_edq measures the Collage optimizers' updates; add --optimizer collage_light or collage_plus"
        )


def check_plugin_layout(cfg: TrainConfig, world_size: int) -> None:
    """Raise UsageError if the plugin cannot run this layout here. Runs before any process group exists."""
    plugin, precision = cfg.plugin, resolve_precision(cfg)
    if plugin != BASELINE and plugin not in PLUGIN_NAMES:
        raise UsageError(f"unknown plugin {plugin!r}; choose one of {', '.join(PLUGIN_NAMES)}")
    check_optimizer_precision(cfg, precision)
    if plugin == BASELINE:
        if cfg.tp > 1 or cfg.pp > 1 or (precision == "fp16" and resolve_optimizer_name(cfg) not in FUSED_OPTIMIZERS):
            raise UsageError("-p none is plain PyTorch (DDP across processes) in fp32 or bf16; drop --tp/--pp/-x fp16")
        return
    if plugin in GPU_ONLY_PLUGINS:
        if not has_cuda():
            raise UsageError(
                f"-p {plugin} needs CUDA GPUs (Gemini's chunk manager is built around them); "
                f"on this CPU-only machine use -p {', '.join(CPU_PLUGINS)}"
            )
        if precision == "fp32":
            raise UsageError(f"-p {plugin} trains in fp16 or bf16 only; pass -x bf16 or -x fp16")
        if cfg.optimizer == "adamw":
            raise UsageError(f"-p {plugin} needs ColossalAI's HybridAdam; pass --optimizer hybrid_adam")
    if plugin == "hybrid_parallel" and cfg.document_attention:
        raise UsageError(
            "--document_attention (and --pack_examples) is not available with -p hybrid_parallel (shardformer builds "
            "its own attention masks); "
            "drop it, or use ddp, zero2, zero2_cpu or gemini"
        )
    if plugin != "hybrid_parallel" and (cfg.tp > 1 or cfg.pp > 1):
        raise UsageError(f"--tp/--pp need -p hybrid_parallel (got -p {plugin})")
    if plugin == "hybrid_parallel":
        if cfg.tp < 1 or cfg.pp < 1:
            raise UsageError("--tp and --pp must be at least 1")
        if world_size % (cfg.tp * cfg.pp) != 0:
            raise UsageError(
                f"world size {world_size} is not divisible by tp*pp = {cfg.tp}*{cfg.pp}; "
                f"launch a multiple of {cfg.tp * cfg.pp} processes or change --tp/--pp"
            )
        if cfg.zero_stage > 0 and precision == "fp32":
            raise UsageError("ZeRO inside hybrid_parallel needs -x bf16 or -x fp16; with -x fp32 pass --zero_stage 0")
        if cfg.pp > 1:
            if cfg.batch_size % cfg.microbatch_size != 0:
                raise UsageError(f"-b {cfg.batch_size} is not a multiple of --microbatch_size {cfg.microbatch_size}")
            if cfg.accumulation_steps > 1:
                raise UsageError(
                    "with --pp > 1 the pipeline already accumulates micro-batches; "
                    "raise -b (a multiple of --microbatch_size) instead of --accumulation_steps"
                )
            if cfg.zero_stage > 1:
                raise UsageError("pipeline parallelism supports --zero_stage 0 or 1, not 2")


# ---------------------------------------------------------------------------------------------
# Launch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _CopyWithoutStateTensors:
    """Stands in for the `copy` module inside colossalai.zero.low_level.low_level_optim (0.5.0).

    `LowLevelZeroOptimizer.state_dict_shard()` and `.state_dict()` deep-copy each parameter's
    optimizer state and then overwrite every tensor in the copy (except "step") with a freshly
    gathered full tensor, so the first copy of the tensors is pure waste: with AdamW, twice the
    model's size in extra memory and about 40% of the optimizer save time. This copies everything
    but those tensors. (The module's third use, load_state_dict's copy of a whole state dict,
    holds no tensors at its top level and is copied exactly as before.)
    """

    @staticmethod
    def deepcopy(value, memo=None):
        import copy

        if not isinstance(value, dict):
            return copy.deepcopy(value, memo)
        return {
            k: v if isinstance(v, torch.Tensor) and k != "step" else copy.deepcopy(v, memo) for k, v in value.items()
        }


def _patch_zero_optimizer_checkpoint_copies() -> None:
    import colossalai
    from colossalai.zero.low_level import low_level_optim

    if colossalai.__version__ == "0.5.0":  # written against that version's state_dict_shard
        low_level_optim.copy = _CopyWithoutStateTensors


def launch(seed: int) -> None:
    """Join the process group that torchrun / `colossalai run` set up, or make a 1-process one
    so that `python pretrain.py` works without a launcher. Applies the CPU patches when needed."""
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not has_cuda():
        from .cpu_compat import apply_cpu_patches

        apply_cpu_patches()
    import colossalai

    _patch_zero_optimizer_checkpoint_copies()
    colossalai.launch_from_torch(seed=seed, verbose=False)
    # ColossalAI logs every checkpoint shard at INFO; our own log lines say what matters.
    from colossalai.logging import get_dist_logger

    get_dist_logger().set_level("WARNING")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def synchronize() -> None:
    """Wait for queued GPU work before reading a clock (CPU work is already done when it returns)."""
    if has_cuda():
        torch.cuda.synchronize()


def device() -> torch.device:
    from colossalai.accelerator import get_accelerator

    return get_accelerator().get_current_device() if has_cuda() else torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# Plugins


@dataclass
class Parallelism:
    """What the training loop needs to know about the layout it runs in."""

    booster: object
    plugin: object
    name: str
    precision: str
    dp_rank: int
    dp_size: int
    pipeline: bool
    optimizer: str = "adamw"

    @property
    def is_last_pipeline_stage(self) -> bool:
        return not self.pipeline or self.plugin.stage_manager.is_last_stage()

    @property
    def fused_update(self) -> bool:
        """The optimizer updates the weights during backward (inplace_sgd)."""
        return self.optimizer in FUSED_OPTIMIZERS

    @property
    def weight_dtype(self) -> torch.dtype | None:
        """The dtype the model is built in when no fp32 master copy may exist: pure bf16, and fp16 with
        inplace_sgd (LOMO's fp16 weights with dynamic loss scaling). None: fp32, and the plugin decides."""
        if self.precision == "pure_bf16":
            return torch.bfloat16
        if self.precision == "fp16" and self.fused_update:
            return torch.float16
        return None


def create_plugin(cfg: TrainConfig, precision: str):
    """The booster plugin named by `-p`, with the run's precision, clipping and layout, and the
    precision the Booster itself must handle (only for ddp, whose plugin leaves precision alone)."""
    from colossalai.booster.plugin import GeminiPlugin, HybridParallelPlugin, LowLevelZeroPlugin, TorchDDPPlugin

    pure_bf16 = precision == "pure_bf16"
    # Pure bf16: ZeRO gets bf16 with master_weights=False (its "master" shard is then a view of the bf16
    # weights); hybrid_parallel has no such switch, so it gets fp32 (it then casts nothing) and a model we
    # built in bf16 — see Parallelism.weight_dtype.
    if pure_bf16:
        precision = "fp32" if cfg.plugin == "hybrid_parallel" else "bf16"
    common = dict(precision=precision, max_norm=cfg.grad_clip, initial_scale=FP16_INITIAL_LOSS_SCALE)
    if cfg.plugin == "gemini":
        placement = dict(
            placement_policy="static",
            shard_param_frac=cfg.shard_param_frac,
            offload_optim_frac=cfg.offload_optim_frac,
            offload_param_frac=cfg.offload_param_frac,
        )
        return GeminiPlugin(**placement, enable_flash_attention=cfg.flash_attention, **common), None
    if cfg.plugin == "gemini_auto":
        placement = dict(placement_policy="auto", warmup_non_model_data_ratio=cfg.gemini_warmup_ratio)
        return GeminiPlugin(**placement, enable_flash_attention=cfg.flash_attention, **common), None
    if cfg.plugin in ("zero2", "zero2_cpu"):
        offload = cfg.plugin == "zero2_cpu"
        return LowLevelZeroPlugin(stage=2, cpu_offload=offload, master_weights=not pure_bf16, **common), None
    if cfg.plugin == "hybrid_parallel":
        pipeline_args = dict(microbatch_size=cfg.microbatch_size) if cfg.pp > 1 else {}
        plugin = HybridParallelPlugin(
            tp_size=cfg.tp,
            pp_size=cfg.pp,
            zero_stage=cfg.zero_stage,
            enable_flash_attention=cfg.flash_attention and has_cuda(),
            **pipeline_args,
            **common,
        )
        return plugin, None
    # ddp: torch DDP leaves precision alone; fp16 goes through the Booster's torch AMP, bf16 through
    # autocast in `forward_context` (bf16 needs no loss scaling), pure bf16 through a bf16 model.
    # inplace_sgd scales an fp16 loss itself, inside its fused backward.
    # gradient_as_bucket_view: the gradients live in DDP's communication buckets instead of beside them,
    # which saves one copy of the gradients.
    amp_fp16 = precision == "fp16" and resolve_optimizer_name(cfg) not in FUSED_OPTIMIZERS
    return TorchDDPPlugin(gradient_as_bucket_view=True), ("fp16" if amp_fp16 else None)


class PlainTorch:
    """`-p none`: what the loop would be without ColossalAI — the model on the device, wrapped in
    torch DDP when there are several processes, `loss.backward()`, `optimizer.step()`. It stands in
    for both the booster and its plugin, so the training loop runs unchanged."""

    def boost(self, model, optimizer, lr_scheduler=None):
        model = model.to(device())
        if dist.get_world_size() > 1:
            model = torch.nn.parallel.DistributedDataParallel(model)
        return model, optimizer, None, None, lr_scheduler

    def backward(self, loss, optimizer) -> None:
        loss.backward()

    def support_no_sync(self) -> bool:
        return True

    def no_sync(self, model, optimizer):
        return (
            model.no_sync()
            if isinstance(model, torch.nn.parallel.DistributedDataParallel)
            else contextlib.nullcontext()
        )


def keep_ddp_buckets_small(model: torch.nn.Module) -> None:
    """For inplace_sgd under torch DDP. DDP allocates gradient buckets as large as the model when it
    wraps it, which is the memory in-place SGD exists to avoid, and our optimizer's hooks all-reduce
    each gradient themselves (DDP only runs in no_sync). So DDP is told to ignore every parameter
    but the smallest (it refuses a model with nothing to synchronise). Call before wrapping."""
    from torch.nn.parallel import DistributedDataParallel

    names = [name for name, _ in model.named_parameters()]
    smallest = min(model.named_parameters(), key=lambda item: item[1].numel())[0]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, [n for n in names if n != smallest])


def build_parallelism(cfg: TrainConfig) -> Parallelism:
    from colossalai.booster import Booster
    from colossalai.booster.plugin import HybridParallelPlugin

    precision, optimizer = resolve_precision(cfg), resolve_optimizer_name(cfg)
    check_plugin_layout(cfg, dist.get_world_size())
    if cfg.plugin == BASELINE:
        plain = PlainTorch()
        rank, world = dist.get_rank(), dist.get_world_size()
        return Parallelism(plain, plain, BASELINE, precision, rank, world, pipeline=False, optimizer=optimizer)
    plugin, booster_precision = create_plugin(cfg, precision)
    booster = Booster(plugin=plugin, mixed_precision=booster_precision)
    if isinstance(plugin, HybridParallelPlugin):
        dp_rank, dp_size = dist.get_rank(plugin.dp_group), plugin.dp_size
    else:
        dp_rank, dp_size = dist.get_rank(), dist.get_world_size()
    return Parallelism(booster, plugin, cfg.plugin, precision, dp_rank, dp_size, cfg.pp > 1, optimizer)


def model_init_context(par: Parallelism):
    """Gemini and hybrid_parallel can materialise weights lazily, shard by shard, so a 70B model
    never sits whole in one process. (LazyInit with LowLevelZero hits a RecursionError in 0.5.0.)
    Not for 16-bit weights without masters: lazy tensors materialise in fp32 whatever dtype they
    were built in, so those models are built whole, directly in bf16/fp16, then sharded."""
    from colossalai.booster.plugin import GeminiPlugin, HybridParallelPlugin
    from colossalai.lazy import LazyInitContext

    if isinstance(par.plugin, (GeminiPlugin, HybridParallelPlugin)) and par.weight_dtype is None:
        return LazyInitContext(default_device=device())
    return contextlib.nullcontext()


def forward_context(par: Parallelism):
    """bf16 autocast for ddp (the other plugins cast the model themselves)."""
    if par.name in ("ddp", BASELINE) and par.precision == "bf16":
        return torch.autocast(device_type=device().type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def no_sync_context(par: Parallelism, model, optimizer, is_last_micro_step: bool):
    """Skip the gradient all-reduce on accumulation micro-steps where the plugin allows it.
    (ZeRO-2 reduce-scatters every micro-step by design; it still accumulates correctly.)
    inplace_sgd always runs outside DDP's reducer: it all-reduces each gradient itself, in its hook."""
    if par.fused_update and dist.get_world_size() > 1:
        return par.booster.no_sync(model, optimizer)
    if is_last_micro_step or not par.plugin.support_no_sync() or getattr(par.plugin, "zero_stage", 0) == 2:
        return contextlib.nullcontext()
    return par.booster.no_sync(model, optimizer)


def run_pipeline(par: Parallelism, model, optimizer, batch: dict) -> torch.Tensor | None:
    """One forward+backward of a pipelined batch. Returns the loss on the last stage, None elsewhere."""
    outputs = par.booster.execute_pipeline(
        iter([batch]), model, criterion=lambda out, _inputs: out.loss, optimizer=optimizer, return_loss=True
    )
    return outputs["loss"] if par.is_last_pipeline_stage else None


def unwrap_optimizer(optimizer):
    """Our optimizer inside the booster's wrapper (ColossalAI wrappers keep it as `.optim`)."""
    return optimizer.unwrap() if hasattr(optimizer, "unwrap") else optimizer


def backward(par: Parallelism, loss: torch.Tensor, optimizer) -> None:
    if par.fused_update:
        unwrap_optimizer(optimizer).fused_backward(loss)  # backward and update, parameter by parameter
    else:
        par.booster.backward(loss, optimizer)


def step_optimizer(par: Parallelism, optimizer, max_norm: float) -> float | None:
    """Clip, step, and return the global gradient norm (before clipping) where it is known.

    The ColossalAI optimizers clip inside `step()` (we passed max_norm to the plugin) and remember
    the norm; torch DDP's wrapper does neither, so we clip here. inplace_sgd already clipped and
    stepped inside its backward pass.
    """
    if par.fused_update:
        return unwrap_optimizer(optimizer).last_grad_norm
    if par.name in ("ddp", BASELINE):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        optimizer.step()
        return float(norm)
    optimizer.step()
    norm = optimizer.get_grad_norm()
    return None if norm is None else float(norm)


def mean_across_replicas(par: Parallelism, *values: torch.Tensor | float | None) -> list[float]:
    """Average per-rank numbers over data-parallel replicas, in one all-reduce, so every rank sees
    the same numbers. With a pipeline only the last stage's numbers count (the others have no loss;
    pass None): they are zeroed elsewhere, and the sum over the pipeline group copies them to every stage."""
    t = torch.stack(
        [
            torch.as_tensor(0.0 if v is None else v, dtype=torch.float32).detach().to(device()).reshape(())
            for v in values
        ]
    )
    if not par.is_last_pipeline_stage:
        t.zero_()
    if par.pipeline:
        dist.all_reduce(t, group=par.plugin.pp_group)
    dp_group = par.plugin.dp_group if par.name == "hybrid_parallel" else None
    dist.all_reduce(t, group=dp_group)
    return (t / par.dp_size).tolist()


def fewest_across_ranks(count: int) -> int:
    """The smallest of every rank's count: how many steps all replicas can take together."""
    t = torch.tensor([count], device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def optimizer_metric_sums(optimizer) -> torch.Tensor:
    """Collage's monitoring sums, added over all ranks (ZeRO and tensor-parallel ranks each hold a
    part of the weights; the metrics are ratios, so replicas counting the same weights cancel out)."""
    sums = unwrap_optimizer(optimizer).metric_sums.detach().clone().to(device())
    dist.all_reduce(sums)
    return sums
