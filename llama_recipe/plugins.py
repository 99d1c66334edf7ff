"""The booster plugins as data: `PLUGINS` maps each `-p` name to a `PluginSpec` that says how to
build the plugin and what the training loop must know about it (GPU-only, clips inside its
optimizer step, bf16 through autocast, lazy init, ...). The loop reads these attributes; it never
compares plugin names. Its default optimizer and what it refuses (pure bf16, --compile, gradient
compression, an optimizer that updates inside backward) are read from it too, with its own layout
rules (`check`); `check_layout` turns every impossible combination into one line.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import TrainConfig
from .distributed import device, has_cuda
from .errors import UsageError
from .optim import OPTIMIZERS

FP16_INITIAL_LOSS_SCALE = 2**16
SP_MODES = ["split_gather", "ring", "all_to_all", "ring_attn"]
SP_ON_TP_GROUP = ("split_gather", "ring")  # these shard the sequence over the tensor-parallel group itself
PP_STYLES = ["1f1b", "interleaved", "zbv"]


def _zero_refuses_compression(layout: str) -> str:
    """Why a ZeRO layout (`layout`: what follows -p) cannot take --grad_compression."""
    return (
        f"--grad_compression compresses the gradient all-reduce of torch DDP, but -p {layout} "
        "reduce-scatters flat ZeRO buckets (each rank keeps a shard, so there is no matrix to factor); use -p ddp, "
        "or -p hybrid_parallel with --zero_stage 0"
    )


def _needs_whole_gradients(cfg: TrainConfig, optimizer: str) -> str:
    return (
        f"--optimizer {optimizer} updates each weight inside the backward pass, which needs whole gradients in "
        f"every process; use -p ddp (one process, or data parallel), not -p {cfg.parallel.plugin}"
    )


def _gemini_refuses_fused_update(cfg: TrainConfig, optimizer: str) -> str:
    return (
        f"-p {cfg.parallel.plugin} cannot host --optimizer {optimizer}: Gemini writes each gradient into its chunk, "
        "reduces whole chunks after backward and updates only in its optimizer's step over fp32 master chunks, "
        "so no parameter's gradient and weight are at hand inside backward; use -p ddp or -p hybrid_parallel --tp N"
    )


def _hybrid_fused_update_refusal(cfg: TrainConfig, optimizer: str) -> str | None:
    par = cfg.parallel
    if par.pp > 1 or par.sp_mode or par.zero_stage > 0:
        return (
            f"--optimizer {optimizer} under -p {par.plugin} runs with tensor and data parallelism only (a pipeline "
            "accumulates micro-batches; ZeRO and sequence parallelism reduce gradients after backward); drop "
            "--pp/--sp_mode/--zero_stage"
        )
    return None


def _shards_matrices(cfg: TrainConfig, optimizer: str) -> str:
    return (
        f"--optimizer {optimizer} orthogonalises whole weight matrices, but -p {cfg.parallel.plugin} hands its "
        "optimizer flat shards of them; use -p ddp, or -p hybrid_parallel with --tp 1 and --zero_stage 0"
    )


def _hybrid_whole_matrix_refusal(cfg: TrainConfig, optimizer: str) -> str | None:
    par = cfg.parallel
    if par.tp > 1 or par.zero_stage > 0:
        return (
            f"--optimizer {optimizer} orthogonalises whole weight matrices, but --tp > 1 splits them and "
            "--zero_stage > 0 hands the optimizer flat shards; use --tp 1 --zero_stage 0 (--pp and data "
            "parallelism keep matrices whole), or -p ddp"
        )
    return None


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
    syncs_every_micro_step: bool = False  # reduces gradients on every micro-step by design (no no_sync)
    document_attention: bool = True  # takes our 4-D document attention masks
    chunked_loss: bool = True  # its forward is transformers' own, so the chunked loss (loss.py) can replace it
    compile_refusal: str | None = None  # why it cannot train --compile (None: it can)
    zero_slices: bool = False  # checkpoints its ZeRO optimizer state as each rank's slices (zero_slices.py)
    uses_booster: bool = True  # False: the plugin object itself stands in for ColossalAI's Booster
    offered: bool = True  # on pretrain.py/finetune.py's -p (False: benchmark.py only)
    pure_bf16_refusal: str | None = None  # why it cannot train -x pure_bf16 (None: it can)
    # why it cannot take --grad_compression, which needs gradients synced by a torch DDP (None: it can)
    compression_refusal: str | None = None
    # (cfg, optimizer) -> why this run cannot use an optimizer that updates inside backward (inplace_sgd), or
    # None; a function because the message names the optimizer and hybrid_parallel's answer depends on the
    # layout. None: the plugin hosts one in any layout.
    fused_update_refusal: Callable[[TrainConfig, str], str | None] | None = None
    # (cfg, optimizer) -> why this run cannot use an optimizer that needs whole weight matrices (muon), or None
    whole_matrix_refusal: Callable[[TrainConfig, str], str | None] | None = None
    lora: bool = False  # offers ColossalAI's Booster.enable_lora (--lora_rank; lora.py)
    # What the planner (planner.py) reads: the ZeRO stage it always runs (None: --zero_stage), whether it keeps
    # the optimizer state on the host, and whether it casts the model to 16 bits itself (ddp: autocast, fp32 weights)
    zero_stage: int | None = 0
    offloads_optimizer: bool = False
    casts_model: bool = True
    planned: bool = True  # False: its memory moves between host and device as it runs (gemini_auto), unmodelled
    # (cfg, precision, world size): raises UsageError where the run breaks this plugin's own rules
    check: Callable[[TrainConfig, str, int], None] | None = None


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
    plugin = HybridParallelPlugin(
        tp_size=par.tp,
        pp_size=par.pp,
        zero_stage=par.zero_stage,
        enable_flash_attention=cfg.model.flash_attention and has_cuda(),
        # In-place SGD runs backward twice on one graph (norm, then update); the vocabulary-parallel cross
        # entropy's backward overwrites its saved logits, so they are gathered and plain cross entropy is used.
        parallel_output=not OPTIMIZERS[resolve_optimizer(cfg)].fused_update,
        **_sequence_parallel(cfg),
        **_pipeline(cfg),
        **common,
    )
    return plugin, None


def _sequence_parallel(cfg: TrainConfig) -> dict:
    """The mode is always passed: without it the plugin picks all_to_all while its shard config
    picks split_gather (ColossalAI 0.5.0), and split_gather without TP fails an assertion."""
    par = cfg.parallel
    if par.sp_mode is None:
        return {}
    return dict(
        enable_sequence_parallelism=True, sequence_parallelism_mode=par.sp_mode, sp_size=sequence_parallel_size(par)
    )


def _pipeline(cfg: TrainConfig) -> dict:
    par = cfg.parallel
    if par.pp == 1:
        return {}
    from colossalai.shardformer import PipelineGradientCheckpointConfig

    options = dict(pp_style=par.pp_style, num_model_chunks=model_chunks(par), overlap_p2p=has_cuda())
    if par.num_microbatches:
        options["num_microbatches"] = par.num_microbatches
    else:
        options["microbatch_size"] = par.microbatch_size
    if par.pp_style == "zbv":
        options["scheduler_nodes"] = _zero_bubble_schedule(
            par.pp, par.num_microbatches or cfg.training.batch_size // par.microbatch_size
        )
    if par.num_layers_per_stage:
        options["num_layers_per_stage"] = list(par.num_layers_per_stage)
    if cfg.model.recompute_layers_per_stage:
        counts = list(cfg.model.recompute_layers_per_stage)
        options["gradient_checkpoint_config"] = PipelineGradientCheckpointConfig(num_ckpt_layers_per_stage=counts)
    return options


def _zero_bubble_schedule(stages: int, microbatches: int) -> list:
    """zbv's V-shaped schedule (ColossalAI's PipelineGraph), with equal costs for the forward, the input-gradient
    and the weight-gradient passes. Memory: a forward keeps activations (2 units) that its two backward passes free."""
    from colossalai.pipeline.schedule.v_schedule import PipelineGraph

    graph = PipelineGraph(
        n_stage=stages,
        n_micro=microbatches,
        f_cost=1000,
        b_cost=1000,
        w_cost=1000,
        c_cost=1,
        f_mem=2,
        b_mem=-1,
        w_mem=-1,
    )
    return graph.get_v_schedule()


def sequence_parallel_size(par) -> int:
    """The ranks sequence parallelism adds to the layout: --sp for all_to_all and ring_attn, which
    have their own group; none for split_gather and ring, which reuse the tensor-parallel group."""
    return par.sp if par.sp_mode is not None and par.sp_mode not in SP_ON_TP_GROUP else 1


def model_parallel_size(par) -> int:
    """Ranks of one model replica (they all read the same batches): tp x pp x sp."""
    return par.tp * par.pp * sequence_parallel_size(par)


def model_chunks(par) -> int:
    """Model chunks per pipeline stage: --num_model_chunks, or what the schedule needs."""
    return par.num_model_chunks or (1 if par.pp_style == "1f1b" else 2)


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
    par = cfg.parallel
    if precision == "pure_bf16" and par.zero_stage > 0:
        raise UsageError(
            "-x pure_bf16 under -p hybrid_parallel needs --zero_stage 0: ColossalAI 0.5.0's ZeRO there always "
            "makes fp32 master copies; for ZeRO-sharded pure bf16 use -p zero2"
        )
    _check_sequence_parallel(par)
    size = model_parallel_size(par)
    if world_size % size != 0:
        sp = f"*sp = {par.tp}*{par.pp}*{par.sp}" if sequence_parallel_size(par) > 1 else f" = {par.tp}*{par.pp}"
        raise UsageError(
            f"world size {world_size} is not divisible by tp*pp{sp}; "
            f"launch a multiple of {size} processes or change --tp/--pp{'/--sp' if par.sp > 1 else ''}"
        )
    if par.zero_stage > 0 and precision == "fp32":
        raise UsageError("ZeRO inside hybrid_parallel needs -x bf16 or -x fp16; with -x fp32 pass --zero_stage 0")
    if par.pp > 1:
        _check_pipeline(cfg)
    else:
        given = _pipeline_flags_given(cfg)
        if given == ["--recompute_layers_per_stage"]:
            raise UsageError(
                "--recompute_layers_per_stage needs --pp > 1 (ColossalAI 0.5.0 crashes on it without a pipeline); "
                "use --recompute full, selective or none"
            )
        if given:
            raise UsageError(f"{', '.join(given)} shape(s) a pipeline: pass --pp 2 or more, or drop them")
    if cfg.compression.grad_compression != "none" and par.zero_stage > 0:
        raise UsageError(_zero_refuses_compression(f"hybrid_parallel --zero_stage {par.zero_stage}"))


def _pipeline_flags_given(cfg: TrainConfig) -> list[str]:
    """The flags that only shape a pipeline which this run sets away from their defaults."""
    par = cfg.parallel
    given = {
        "--pp_style": par.pp_style != "1f1b",
        "--num_model_chunks": par.num_model_chunks not in (None, 1),
        "--num_layers_per_stage": par.num_layers_per_stage,
        "--num_microbatches": par.num_microbatches,
        "--recompute_layers_per_stage": cfg.model.recompute_layers_per_stage,
    }
    return [flag for flag, value in given.items() if value]


def _check_sequence_parallel(par) -> None:
    mode = par.sp_mode
    if mode is None:
        if par.sp > 1:
            raise UsageError(f"--sp {par.sp} needs --sp_mode (all_to_all, or ring_attn on GPUs)")
        return
    if mode == "ring":
        raise UsageError(
            "--sp_mode ring gives wrong weight gradients in ColossalAI 0.5.0 (its ring all-gather, _ring_as_gather, "
            "hands backward its own sequence shard in place of its peers'); use --sp_mode split_gather, the same "
            "split over the --tp group"
        )
    if mode in SP_ON_TP_GROUP:
        if par.tp == 1:
            raise UsageError(
                f"--sp_mode {mode} shards the sequence over the tensor-parallel group; pass --tp 2 or more "
                "(or --sp_mode all_to_all --sp N without TP)"
            )
        if par.sp not in (1, par.tp):
            raise UsageError(
                f"--sp_mode {mode} uses the --tp group (sequence-parallel size = --tp {par.tp}); drop --sp"
            )
        return
    if par.sp == 1:
        raise UsageError(f"--sp_mode {mode} needs --sp 2 or more (the ranks that split each sequence)")
    if mode == "ring_attn" and not (has_cuda() and importlib.util.find_spec("flash_attn")):
        raise UsageError(
            "--sp_mode ring_attn runs ColossalAI's RingAttention, which needs CUDA GPUs and flash-attn; "
            "here use --sp_mode all_to_all (or split_gather with --tp)"
        )


def _check_pipeline(cfg: TrainConfig) -> None:
    par, batch_size = cfg.parallel, cfg.training.batch_size
    if par.num_microbatches:
        if batch_size % par.num_microbatches != 0:
            raise UsageError(f"-b {batch_size} is not divisible by --num_microbatches {par.num_microbatches}")
        microbatches = par.num_microbatches
    else:
        if batch_size % par.microbatch_size != 0:
            raise UsageError(f"-b {batch_size} is not a multiple of --microbatch_size {par.microbatch_size}")
        microbatches = batch_size // par.microbatch_size
    if cfg.training.accumulation_steps > 1:
        raise UsageError(
            "with --pp > 1 the pipeline already accumulates micro-batches; "
            "raise -b (a multiple of --microbatch_size) instead of --accumulation_steps"
        )
    if par.zero_stage > 1:
        raise UsageError("pipeline parallelism supports --zero_stage 0 or 1, not 2")
    chunks, style = model_chunks(par), par.pp_style
    if style == "zbv" and not has_cuda():
        raise UsageError(
            "--pp_style zbv never finishes a step on CPU processes (gloo) with ColossalAI 0.5.0 (measured: tiny4, "
            "--pp 2, no step in 300 s); here use --pp_style 1f1b or interleaved"
        )
    needed = {"1f1b": "exactly 1", "interleaved": "2 or more", "zbv": "exactly 2"}[style]
    if (style == "1f1b" and chunks != 1) or (style == "interleaved" and chunks < 2) or (style == "zbv" and chunks != 2):
        raise UsageError(f"--pp_style {style} needs {needed} --num_model_chunks, got {chunks}")
    if style != "1f1b" and microbatches % par.pp != 0:
        raise UsageError(
            f"--pp_style {style} needs a number of micro-batches divisible by --pp {par.pp}; got {microbatches} "
            "(-b / --microbatch_size, or --num_microbatches)"
        )
    if par.num_layers_per_stage:
        counts = par.num_layers_per_stage
        if style != "1f1b":
            raise UsageError(
                "--num_layers_per_stage works with --pp_style 1f1b only: ColossalAI 0.5.0 takes one count per stage "
                "but its interleaved/zbv schedules read one per model chunk"
            )
        if len(counts) != par.pp:
            raise UsageError(f"--num_layers_per_stage needs one count per pipeline stage ({par.pp}); got {len(counts)}")
    if cfg.model.recompute_layers_per_stage:
        counts = cfg.model.recompute_layers_per_stage
        if len(counts) != par.pp * chunks:
            raise UsageError(
                f"--recompute_layers_per_stage needs one count per stage and model chunk ({par.pp} x {chunks}); "
                f"got {len(counts)}"
            )
        if cfg.model.recompute == "none":
            raise UsageError("--recompute_layers_per_stage recomputes layers; drop --recompute none")


def check_model_split(cfg: TrainConfig, model_config) -> None:
    """The layout fits the model: heads split by TP (and by SP's all_to_all), layers by the pipeline."""
    par = cfg.parallel
    if not plugin_spec(par.plugin).model_parallel:
        return
    heads, kv_heads = model_config.num_attention_heads, model_config.num_key_value_heads
    if heads % par.tp or kv_heads % par.tp:
        raise UsageError(
            f"--tp {par.tp} must divide the model's {heads} attention heads and {kv_heads} key/value heads"
        )
    if par.sp_mode == "all_to_all" and (heads % (par.tp * par.sp) or kv_heads % (par.tp * par.sp)):
        raise UsageError(
            f"--sp_mode all_to_all splits the heads: --sp {par.sp} (x --tp {par.tp}) must divide the model's {heads} "
            f"attention heads and {kv_heads} key/value heads"
        )
    layers = model_config.num_hidden_layers
    if par.pp == 1:
        return
    stages = par.pp * model_chunks(par)
    if par.num_layers_per_stage:
        per_stage = list(par.num_layers_per_stage)
        if sum(per_stage) != layers or 0 in per_stage:
            raise UsageError(
                f"--num_layers_per_stage {','.join(map(str, per_stage))} must give every stage at least one layer and add "
                f"up to the model's {layers} layers"
            )
    elif layers < stages:
        raise UsageError(f"the model's {layers} layers cannot fill {par.pp} stages x {model_chunks(par)} chunks")
    else:
        per_stage = _even_split(layers, stages)
    if cfg.model.recompute_layers_per_stage:
        counts = cfg.model.recompute_layers_per_stage
        if any(c > n for c, n in zip(counts, per_stage, strict=False)):
            raise UsageError(
                f"--recompute_layers_per_stage {','.join(map(str, counts))} asks more layers than the stages "
                f"hold ({','.join(map(str, per_stage))})"
            )


def _even_split(layers: int, stages: int) -> list[int]:
    """ColossalAI's default split (PipelineStageManager.distribute_layers): the remainder goes to the middle stages."""
    per_stage = [layers // stages] * stages
    start = stages // 2 - (layers % stages) // 2
    for i in range(start, start + layers % stages):
        per_stage[i] += 1
    return per_stage


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


# Gemini: chunked loss off until it has run on a GPU (Gemini gathers each weight through hooks on its use).
_GEMINI = dict(
    gpu_only=True,
    default_optimizer="hybrid_adam",
    lazy_init=True,
    chunked_loss=False,
    compile_refusal="--compile is not available with -p gemini/gemini_auto (Gemini fetches each weight through "
    "parameter hooks that torch.compile does not trace); drop --compile, or use -p zero2 or ddp",
    fused_update_refusal=_gemini_refuses_fused_update,
    zero_stage=3,
    whole_matrix_refusal=_shards_matrices,
    check=_check_gemini,
)
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
            planned=False,
            pure_bf16_refusal=_gemini_refuses_pure_bf16("gemini_auto"),
            compression_refusal=_zero_refuses_compression("gemini_auto"),
            **_GEMINI,
        ),
        PluginSpec(
            "zero2",
            "ZeRO-2: optimizer state and gradients sharded (`LowLevelZeroPlugin(stage=2)`)",
            _zero2(cpu_offload=False),
            zero_stage=2,
            syncs_every_micro_step=True,
            zero_slices=True,
            lora=True,
            compression_refusal=_zero_refuses_compression("zero2"),
            fused_update_refusal=_needs_whole_gradients,
            whole_matrix_refusal=_shards_matrices,
        ),
        PluginSpec(
            "zero2_cpu",
            "ZeRO-2 with the optimizer state offloaded to CPU",
            _zero2(cpu_offload=True),
            zero_stage=2,
            offloads_optimizer=True,
            syncs_every_micro_step=True,
            zero_slices=True,
            lora=True,
            compression_refusal=_zero_refuses_compression("zero2_cpu"),
            fused_update_refusal=_needs_whole_gradients,
            whole_matrix_refusal=_shards_matrices,
        ),
        PluginSpec(
            "hybrid_parallel",
            "tensor x pipeline x sequence x data parallel (`--tp`, `--pp`, `--sp`, `--zero_stage`, `--pp_style`)",
            _hybrid_parallel,
            model_parallel=True,
            zero_stage=None,
            lazy_init=True,
            document_attention=False,
            chunked_loss=False,  # shardformer's forward: a vocabulary-parallel lm_head and its own cross-entropy
            compile_refusal="--compile is not available with -p hybrid_parallel (shardformer replaces the layers' "
            "forward with ColossalAI's, whose tensor/pipeline collectives are not verified under torch.compile); "
            "drop --compile, or use -p zero2 or ddp",
            fused_update_refusal=_hybrid_fused_update_refusal,
            whole_matrix_refusal=_hybrid_whole_matrix_refusal,
            check=_check_hybrid_parallel,  # refuses --grad_compression under ZeRO (--zero_stage > 0)
        ),
        PluginSpec(
            "ddp",
            "PyTorch DDP (`TorchDDPPlugin`)",
            _ddp,
            casts_model=False,
            clips_in_step=False,
            autocast_bf16=True,
            lora=True,
            check=_check_ddp,
        ),
        PluginSpec(
            "none",
            "plain PyTorch, no booster (benchmark.py's baseline)",
            lambda cfg, precision: (PlainTorch(), None),
            casts_model=False,
            clips_in_step=False,
            autocast_bf16=True,
            uses_booster=False,
            offered=False,
            compression_refusal="-p none is the plain-PyTorch baseline; --grad_compression needs -p ddp",
            check=_check_plain_torch,
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
        if spec.fused_update_refusal and (refusal := spec.fused_update_refusal(cfg, optimizer)):
            raise UsageError(refusal)
        if cfg.training.accumulation_steps > 1:
            raise UsageError(
                f"--optimizer {optimizer} applies the update during the backward pass, so gradients cannot "
                "accumulate; drop --accumulation_steps and raise -b instead"
            )
    if facts.whole_matrices and spec.whole_matrix_refusal and (refusal := spec.whole_matrix_refusal(cfg, optimizer)):
        raise UsageError(refusal)
    if cfg.logging.log_edq and not facts.monitored:
        raise UsageError(
            "--log_edq measures the Collage optimizers' updates; add --optimizer collage_light or collage_plus"
        )


def check_layout(cfg: TrainConfig, world_size: int) -> None:
    """Raise UsageError if the plugin cannot run this layout, optimizer and precision here.
    Needs no process group (the world size is passed in), so cli.validate runs it before one exists."""
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
    if cfg.model.compile and spec.compile_refusal:
        raise UsageError(spec.compile_refusal)
    if not spec.model_parallel and (cfg.parallel.tp > 1 or cfg.parallel.pp > 1):
        model_parallel = [n for n in PLUGIN_NAMES if PLUGINS[n].model_parallel]
        raise UsageError(f"--tp/--pp need -p {' or '.join(model_parallel)} (got -p {spec.name})")
    if spec.check:
        spec.check(cfg, precision, world_size)
    _check_compression(cfg, spec)


def _check_compression(cfg: TrainConfig, spec: PluginSpec) -> None:
    comp, pp = cfg.compression, cfg.parallel.pp
    if comp.grad_compression != "none" and spec.compression_refusal:
        raise UsageError(spec.compression_refusal)
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
