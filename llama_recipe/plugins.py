"""The booster plugins as data: `PLUGINS` maps each `-p` name to a `PluginSpec` that says how to
build the plugin and what the training loop must know about it (GPU-only, clips inside its
optimizer step, bf16 through autocast, lazy init, ...). The loop reads these attributes; it never
compares plugin names. Which optimizer and precision a plugin defaults to, needs or refuses is
data here too, and `check_layout` turns every impossible combination into one line.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import TrainConfig
from .distributed import device, has_cuda
from .errors import UsageError
from .optim import OPTIMIZERS

FP16_INITIAL_LOSS_SCALE = 2**16


def _no_extra_checks(cfg: TrainConfig, precision: str, world_size: int) -> None:
    pass


def _compresses(cfg: TrainConfig) -> str | None:
    return None


def _zero_refuses_compression(name: str) -> Callable[[TrainConfig], str]:
    return lambda cfg: (
        f"--grad_compression compresses the gradient all-reduce of torch DDP, but -p {name} reduce-scatters flat "
        "ZeRO buckets (each rank keeps a shard, so there is no matrix to factor); use -p ddp, or -p hybrid_parallel "
        "with --zero_stage 0"
    )


@dataclass(frozen=True)
class PluginSpec:
    name: str
    summary: str  # one line for the README's table
    build: Callable[[TrainConfig, str], tuple[object, str | None]]  # -> (plugin, precision the Booster must handle)
    gpu_only: bool = False
    default_optimizer: str = "adamw"
    model_parallel: bool = False  # takes --tp/--pp; its data-parallel group is the plugin's own
    clips_in_step: bool = True  # its optimizer wrapper clips inside step() (max_norm) and reports the norm
    autocast_bf16: bool = False  # leaves precision alone: bf16 compute goes through torch.autocast
    lazy_init: bool = False  # can materialise the weights shard by shard (ColossalAI's LazyInitContext)
    whole_gradients: bool = False  # every rank holds whole gradients (what an update inside backward needs)
    syncs_every_micro_step: bool = False  # reduces gradients on every micro-step by design (no no_sync)
    document_attention: bool = True  # takes our 4-D document attention masks
    uses_booster: bool = True  # False: the plugin object itself stands in for ColossalAI's Booster
    offered: bool = True  # on pretrain.py/finetune.py's -p (False: benchmark.py only)
    pure_bf16_refusal: str | None = None  # why it cannot train -x pure_bf16 (None: it can)
    check: Callable[[TrainConfig, str, int], None] = _no_extra_checks  # its own layout rules
    # why it cannot take --grad_compression (None: it can); its gradients must be synced by a torch DDP
    compression_refusal: Callable[[TrainConfig], str | None] = _zero_refuses_compression("this plugin")


# ---------------------------------------------------------------------------------------------
# How each plugin is built


def _common(cfg: TrainConfig, precision: str) -> dict:
    return dict(precision=precision, max_norm=cfg.optim.grad_clip, initial_scale=FP16_INITIAL_LOSS_SCALE)


def _gemini(placement_policy: str) -> Callable:
    def build(cfg: TrainConfig, precision: str):
        from colossalai.booster.plugin import GeminiPlugin

        par = cfg.parallel
        if placement_policy == "static":
            placement = dict(
                shard_param_frac=par.shard_param_frac,
                offload_optim_frac=par.offload_optim_frac,
                offload_param_frac=par.offload_param_frac,
            )
        else:
            placement = dict(warmup_non_model_data_ratio=par.gemini_warmup_ratio)
        plugin = GeminiPlugin(
            placement_policy=placement_policy,
            **placement,
            enable_flash_attention=cfg.model.flash_attention,
            **_common(cfg, precision),
        )
        return plugin, None

    return build


def _zero2(cpu_offload: bool) -> Callable:
    def build(cfg: TrainConfig, precision: str):
        from colossalai.booster.plugin import LowLevelZeroPlugin

        # Pure bf16: bf16 with master_weights=False, so ZeRO's "master" shard is a view of the bf16 weights.
        pure_bf16 = precision == "pure_bf16"
        common = _common(cfg, "bf16" if pure_bf16 else precision)
        return LowLevelZeroPlugin(stage=2, cpu_offload=cpu_offload, master_weights=not pure_bf16, **common), None

    return build


def _hybrid_parallel(cfg: TrainConfig, precision: str):
    from colossalai.booster.plugin import HybridParallelPlugin

    par = cfg.parallel
    # Pure bf16: no master-weights switch here, so the plugin runs at fp32 (it then casts nothing)
    # around a model we built in bf16 (see Parallelism.weight_dtype).
    common = _common(cfg, "fp32" if precision == "pure_bf16" else precision)
    pipeline = dict(microbatch_size=par.microbatch_size) if par.pp > 1 else {}
    plugin = HybridParallelPlugin(
        tp_size=par.tp,
        pp_size=par.pp,
        zero_stage=par.zero_stage,
        enable_flash_attention=cfg.model.flash_attention and has_cuda(),
        **pipeline,
        **common,
    )
    return plugin, None


def _fp16_through_booster(cfg: TrainConfig, precision: str) -> str | None:
    """torch DDP leaves precision alone: fp16 goes through the Booster's torch AMP (bf16 through
    autocast, pure bf16 through a bf16 model). In-place SGD scales an fp16 loss itself."""
    fused = OPTIMIZERS[resolve_optimizer(cfg)].fused_update
    return "fp16" if precision == "fp16" and not fused else None


def _ddp(cfg: TrainConfig, precision: str):
    from colossalai.booster.plugin import TorchDDPPlugin

    # gradient_as_bucket_view: gradients live in DDP's communication buckets, one gradient copy less.
    return TorchDDPPlugin(gradient_as_bucket_view=True), _fp16_through_booster(cfg, precision)


class PlainTorch:
    """`-p none` (benchmark.py): the loop without ColossalAI — the model on the device, wrapped in
    torch DDP when there are several processes, `loss.backward()`, `optimizer.step()`. It stands in
    for both the Booster and its plugin, so the training loop runs unchanged."""

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
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            return model.no_sync()
        return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# Each plugin's own rules


def _check_gemini(cfg: TrainConfig, precision: str, world_size: int) -> None:
    plugin = cfg.parallel.plugin
    if precision == "fp32":
        raise UsageError(f"-p {plugin} trains in fp16 or bf16 only; pass -x bf16 or -x fp16")
    if cfg.optim.optimizer == "adamw":
        raise UsageError(f"-p {plugin} needs ColossalAI's HybridAdam; pass --optimizer hybrid_adam")


def _check_hybrid_parallel(cfg: TrainConfig, precision: str, world_size: int) -> None:
    par, batch_size = cfg.parallel, cfg.training.batch_size
    if precision == "pure_bf16" and par.zero_stage > 0:
        raise UsageError(
            "-x pure_bf16 under -p hybrid_parallel needs --zero_stage 0: ColossalAI 0.5.0's ZeRO there always "
            "makes fp32 master copies; for ZeRO-sharded pure bf16 use -p zero2"
        )
    if world_size % (par.tp * par.pp) != 0:
        raise UsageError(
            f"world size {world_size} is not divisible by tp*pp = {par.tp}*{par.pp}; "
            f"launch a multiple of {par.tp * par.pp} processes or change --tp/--pp"
        )
    if par.zero_stage > 0 and precision == "fp32":
        raise UsageError("ZeRO inside hybrid_parallel needs -x bf16 or -x fp16; with -x fp32 pass --zero_stage 0")
    if par.pp > 1:
        if batch_size % par.microbatch_size != 0:
            raise UsageError(f"-b {batch_size} is not a multiple of --microbatch_size {par.microbatch_size}")
        if cfg.training.accumulation_steps > 1:
            raise UsageError(
                "with --pp > 1 the pipeline already accumulates micro-batches; "
                "raise -b (a multiple of --microbatch_size) instead of --accumulation_steps"
            )
        if par.zero_stage > 1:
            raise UsageError("pipeline parallelism supports --zero_stage 0 or 1, not 2")


def _hybrid_compression_refusal(cfg: TrainConfig) -> str | None:
    if cfg.parallel.zero_stage > 0:
        return _zero_refuses_compression(f"hybrid_parallel --zero_stage {cfg.parallel.zero_stage}")(cfg)
    return None


def _check_ddp(cfg: TrainConfig, precision: str, world_size: int) -> None:
    if _fp16_through_booster(cfg, precision) and not has_cuda():
        raise UsageError(
            "-x fp16 with -p ddp goes through ColossalAI's torch AMP, which needs CUDA; on this CPU-only machine "
            "pass -x fp32 or -x bf16 (or --optimizer inplace_sgd, which scales an fp16 loss itself)"
        )


def _check_plain_torch(cfg: TrainConfig, precision: str, world_size: int) -> None:
    if precision == "fp16" and not OPTIMIZERS[resolve_optimizer(cfg)].fused_update:
        raise UsageError("-p none is plain PyTorch (DDP across processes) in fp32 or bf16; drop -x fp16")


def _gemini_refuses_pure_bf16(name: str) -> str:
    return (
        f"-p {name} always keeps fp32 master chunks and needs HybridAdam, so it cannot train pure bf16 "
        "(-x pure_bf16 / --optimizer collage_*); use -p zero2, zero2_cpu, ddp or hybrid_parallel"
    )


_GEMINI = dict(gpu_only=True, default_optimizer="hybrid_adam", lazy_init=True, check=_check_gemini)
PLUGINS: dict[str, PluginSpec] = {
    spec.name: spec
    for spec in [
        PluginSpec(
            "gemini",
            'ZeRO-3-like chunked sharding, all on GPU (`GeminiPlugin(placement_policy="static")`)',
            _gemini("static"),
            pure_bf16_refusal=_gemini_refuses_pure_bf16("gemini"),
            compression_refusal=_zero_refuses_compression("gemini"),
            **_GEMINI,
        ),
        PluginSpec(
            "gemini_auto",
            "Gemini with automatic CPU/GPU placement",
            _gemini("auto"),
            pure_bf16_refusal=_gemini_refuses_pure_bf16("gemini_auto"),
            compression_refusal=_zero_refuses_compression("gemini_auto"),
            **_GEMINI,
        ),
        PluginSpec(
            "zero2",
            "ZeRO-2: optimizer state and gradients sharded (`LowLevelZeroPlugin(stage=2)`)",
            _zero2(cpu_offload=False),
            syncs_every_micro_step=True,
            compression_refusal=_zero_refuses_compression("zero2"),
        ),
        PluginSpec(
            "zero2_cpu",
            "ZeRO-2 with the optimizer state offloaded to CPU",
            _zero2(cpu_offload=True),
            syncs_every_micro_step=True,
            compression_refusal=_zero_refuses_compression("zero2_cpu"),
        ),
        PluginSpec(
            "hybrid_parallel",
            "tensor x pipeline x data parallel (`--tp`, `--pp`, `--zero_stage`, `--microbatch_size`)",
            _hybrid_parallel,
            model_parallel=True,
            lazy_init=True,
            document_attention=False,
            check=_check_hybrid_parallel,
            compression_refusal=_hybrid_compression_refusal,
        ),
        PluginSpec(
            "ddp",
            "PyTorch DDP (`TorchDDPPlugin`)",
            _ddp,
            clips_in_step=False,
            autocast_bf16=True,
            whole_gradients=True,
            check=_check_ddp,
            compression_refusal=_compresses,
        ),
        PluginSpec(
            "none",
            "plain PyTorch, no booster (benchmark.py's baseline)",
            lambda cfg, precision: (PlainTorch(), None),
            clips_in_step=False,
            autocast_bf16=True,
            whole_gradients=True,
            uses_booster=False,
            offered=False,
            check=_check_plain_torch,
            compression_refusal=lambda cfg: "-p none is the plain-PyTorch baseline; --grad_compression needs -p ddp",
        ),
    ]
}
PLUGIN_NAMES = [name for name, spec in PLUGINS.items() if spec.offered]
CPU_PLUGINS = [name for name in PLUGIN_NAMES if not PLUGINS[name].gpu_only]


def plugin_spec(name: str) -> PluginSpec:
    if name not in PLUGINS:
        raise UsageError(f"unknown plugin {name!r}; choose one of {', '.join(PLUGIN_NAMES)}")
    return PLUGINS[name]


def create_plugin(cfg: TrainConfig, precision: str) -> tuple[object, str | None]:
    """The plugin `-p` names, built for this run's precision, clipping and layout, and the precision
    the Booster itself must handle (only ddp's, whose plugin leaves precision alone)."""
    return plugin_spec(cfg.parallel.plugin).build(cfg, precision)


# ---------------------------------------------------------------------------------------------
# Optimizer, precision and the combinations that cannot work


def resolve_optimizer(cfg: TrainConfig) -> str:
    """--optimizer, or the plugin's default (Gemini works only with ColossalAI's HybridAdam)."""
    return cfg.optim.optimizer or plugin_spec(cfg.parallel.plugin).default_optimizer


def resolve_precision(cfg: TrainConfig) -> str:
    """-x, or: pure bf16 for Collage, whose point is having no fp32 copy of anything; bf16 on GPUs;
    fp32 on CPUs, where bf16 matrix products run about 100x slower than fp32."""
    if cfg.parallel.mixed_precision:
        return cfg.parallel.mixed_precision
    if OPTIMIZERS[resolve_optimizer(cfg)].bf16_without_masters:
        return "pure_bf16"
    return "bf16" if has_cuda() else "fp32"


def _check_optimizer(cfg: TrainConfig, spec: PluginSpec, optimizer: str, precision: str) -> None:
    facts = OPTIMIZERS[optimizer]
    if facts.bf16_without_masters and precision != "pure_bf16":
        raise UsageError(
            f"--optimizer {optimizer} keeps bf16 weights plus bf16 error terms instead of fp32 master weights; "
            f"drop -x {precision} (or pass -x pure_bf16)"
        )
    if precision == "pure_bf16":
        if spec.pure_bf16_refusal:
            raise UsageError(spec.pure_bf16_refusal)
        if facts.fp32_states:
            raise UsageError(
                f"{optimizer} keeps fp32 optimizer states; with -x pure_bf16 use --optimizer adamw or collage_*"
            )
    if facts.fused_update:
        if cfg.compression.grad_compression != "none":
            raise UsageError(
                f"--optimizer {optimizer} all-reduces each gradient itself inside the backward pass, outside DDP's "
                "communication hook; drop --grad_compression or use --optimizer adamw"
            )
        if not spec.whole_gradients:
            raise UsageError(
                f"--optimizer {optimizer} updates each weight inside the backward pass, which needs whole gradients in "
                f"every process; use -p ddp (one process, or data parallel), not -p {spec.name}"
            )
        if cfg.training.accumulation_steps > 1:
            raise UsageError(
                f"--optimizer {optimizer} applies the update during the backward pass, so gradients cannot "
                "accumulate; drop --accumulation_steps and raise -b instead"
            )
    if cfg.logging.log_edq and not facts.monitored:
        raise UsageError(
            "--log_edq measures the Collage optimizers' updates; add --optimizer collage_light or collage_plus"
        )


def check_layout(cfg: TrainConfig, world_size: int) -> None:
    """Raise UsageError if the plugin cannot run this layout, optimizer and precision here.
    Runs before any process group exists."""
    spec = plugin_spec(cfg.parallel.plugin)
    optimizer, precision = resolve_optimizer(cfg), resolve_precision(cfg)
    _check_optimizer(cfg, spec, optimizer, precision)
    if spec.gpu_only and not has_cuda():
        raise UsageError(
            f"-p {spec.name} needs CUDA GPUs (Gemini's chunk manager is built around them); "
            f"on this CPU-only machine use -p {', '.join(CPU_PLUGINS)}"
        )
    if cfg.model.document_attention and not spec.document_attention:
        raise UsageError(
            f"--document_attention (and --pack_examples) is not available with -p {spec.name} (shardformer builds "
            f"its own attention masks); drop it, or use {', '.join(n for n in PLUGIN_NAMES if PLUGINS[n].document_attention)}"
        )
    if not spec.model_parallel and (cfg.parallel.tp > 1 or cfg.parallel.pp > 1):
        model_parallel = [n for n in PLUGIN_NAMES if PLUGINS[n].model_parallel]
        raise UsageError(f"--tp/--pp need -p {' or '.join(model_parallel)} (got -p {spec.name})")
    spec.check(cfg, precision, world_size)
    _check_compression(cfg, spec)


def _check_compression(cfg: TrainConfig, spec: PluginSpec) -> None:
    comp, pp = cfg.compression, cfg.parallel.pp
    refusal = comp.grad_compression != "none" and spec.compression_refusal(cfg)
    if refusal:
        raise UsageError(refusal)
    if comp.compress_stages and comp.grad_compression == "none":
        raise UsageError("--compress_stages selects which pipeline stages compress; add --grad_compression powersgd")
    if comp.compress_stages and not (spec.model_parallel and comp.compress_stages <= pp and pp > 1):
        raise UsageError(
            f"--compress_stages {comp.compress_stages} needs a pipeline of at least that many stages "
            f"(-p hybrid_parallel --pp > 1, got --pp {pp}); lower it or drop it"
        )
    if comp.compress_backprop and not (spec.model_parallel and pp > 1):
        raise UsageError(
            f"--compress_backprop compresses the gradients pipeline stages send each other; it needs -p hybrid_parallel "
            f"--pp > 1 (got -p {spec.name} --pp {pp}): add --pp or drop --compress_backprop"
        )
    if comp.compress_backprop_epilogue_only and not comp.compress_backprop:
        raise UsageError("--compress_backprop_epilogue_only needs --compress_backprop R (the rank)")
