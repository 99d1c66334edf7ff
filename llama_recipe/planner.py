"""The memory and step-time planner: for a model, a device count and memory per device, which layouts
fit, with each one's predicted peak memory per device by role and a predicted step time
(scripts/plan.py prints the table; docs/planning.md says how to read it and how it was calibrated).

Pure functions of the model's shape and the layout; nothing is built. The bytes come from what the
plugins really keep, counted tensor by tensor (calibrated against `--memory_accounting`, which counts
every tensor a boosted model and optimizer reach):

- state (weights, gradients, optimizer): per parameter tensor of this rank's share (tensor-parallel
  splits, its pipeline stage's layers, ZeRO's per-tensor padding to a multiple of the data-parallel
  size), in the dtype each plugin stores it in, plus the rotary frequencies buffer and Adam's 4-byte
  step counter per tensor;
- activations: what each decoder layer keeps for backward under each recompute mode (counted op by
  op for transformers' LLaMA with SDPA; see LAYER_KEPT), times the micro-batches a pipeline stage
  holds at once, plus the chunked loss's own buffers;
- communication buffers: ZeRO's gradient-reduce bucket, Gemini's gathered chunks;
- step time: FLOPs / (devices x peak x MFU) + the bytes each collective moves / the link's bandwidth
  + the pipeline bubble.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .loss import CHUNK_TOKENS
from .metrics import training_flops_per_token
from .optim import OPTIMIZERS
from .plugins import PLUGINS, _even_split, resolve_optimizer, resolve_precision
from .recompute import recompute_mode

GiB = 2**30
ROLES = ("weights", "gradients", "optimizer", "activations", "communication")
VOCAB_MULTIPLE = 64  # shardformer pads the vocabulary to a multiple of 64 x tp (make_vocab_size_divisible_by)
ZERO_BUCKET_ELEMENTS = 12 * 2**20  # LowLevelZeroPlugin's reduce_bucket_size_in_m=12 (hybrid_parallel: 1M)
HYBRID_ZERO_BUCKET_ELEMENTS = 2**20
GEMINI_CHUNK_BYTES = 2 * 64 * 2**20  # two 64 MiB chunks gathered at once (the one in use and the prefetched)


@dataclass(frozen=True)
class Layout:
    """One way to run: the plugin and its parallel sizes, micro-batch, recompute, precision, optimizer."""

    plugin: str
    devices: int
    tp: int = 1
    pp: int = 1
    zero_stage: int = 0  # hybrid_parallel's --zero_stage; zero2/zero2_cpu are 2, gemini 3
    microbatch_size: int = 1  # sequences per forward (the pipeline's micro-batch; -b per replica otherwise)
    recompute: str = "none"
    precision: str = "bf16"
    optimizer: str = "adamw"
    offload: bool = False  # optimizer state (masters and moments) on the host: zero2_cpu

    @property
    def dp(self) -> int:
        return self.devices // (self.tp * self.pp)

    @classmethod
    def of(cls, cfg, devices: int) -> tuple[Layout, int]:
        """This run's layout (`cfg`: a TrainConfig on `devices` processes) and its micro-batches per
        optimizer step (the pipeline's, or --accumulation_steps)."""
        par, batch = cfg.parallel, cfg.training.batch_size
        pipeline = par.pp > 1
        mbs = (batch // par.num_microbatches if par.num_microbatches else par.microbatch_size) if pipeline else batch
        layout = cls(
            par.plugin,
            devices,
            par.tp,
            par.pp,
            par.zero_stage,
            mbs,
            recompute_mode(cfg.model),
            resolve_precision(cfg),
            resolve_optimizer(cfg),
            offload=PLUGINS[par.plugin].offloads_optimizer,
        )
        return layout, batch // mbs if pipeline else cfg.training.accumulation_steps

    def describe(self) -> str:
        parts = [self.plugin]
        if self.tp > 1 or self.pp > 1:
            parts.append(f"tp{self.tp} pp{self.pp}")
        if PLUGINS[self.plugin].zero_stage is None:
            parts.append(f"zero{self.zero_stage}")
        parts.append(f"dp{self.dp} mbs{self.microbatch_size} {self.recompute}")
        return " ".join(parts)


@dataclass(frozen=True)
class Shape:
    """The few numbers of a LLaMA config the planner needs."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool

    @classmethod
    def of(cls, config) -> Shape:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            config.hidden_size,
            config.num_hidden_layers,
            config.num_attention_heads,
            config.num_key_value_heads,
            head_dim,
            config.intermediate_size,
            config.vocab_size,
            bool(config.tie_word_embeddings),
        )


# ---------------------------------------------------------------------------------------------
# State: weights, gradients, optimizer


def stage_layers(shape: Shape, pp: int) -> list[int]:
    """Decoder layers of each pipeline stage: ColossalAI's default split (plugins._even_split)."""
    return _even_split(shape.layers, pp) if pp > 1 else [shape.layers]


def parameter_tensors(shape: Shape, tp: int = 1, pp: int = 1, stage: int = 0) -> list[tuple[int, bool]]:
    """(elements on this rank, is a hidden matrix) of every parameter tensor of `stage` of a tp x pp layout.
    Tensor parallelism splits the projections and the (padded) vocabulary; the RMSNorm gains stay whole."""
    h, q, kv = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    vocab = shape.vocab
    if tp > 1:
        multiple = VOCAB_MULTIPLE * tp
        vocab = math.ceil(vocab / multiple) * multiple
    layer = [(h * q // tp, True), (h * kv // tp, True), (h * kv // tp, True), (q * h // tp, True)]
    layer += [(h * shape.ffn // tp, True)] * 3 + [(h, False)] * 2
    tensors = layer * stage_layers(shape, pp)[stage]
    embedding = (vocab * h // tp, False)
    if stage == 0:
        tensors.insert(0, embedding)
    if stage == pp - 1:
        tensors += [(h, False)] + ([] if shape.tied and pp == 1 else [embedding])
    return tensors


def _plugin_casts(layout: Layout) -> bool:
    """The plugin casts the model (buffers included) to 16 bits itself (ZeRO, Gemini, hybrid_parallel);
    ddp leaves it fp32 under autocast, and pure bf16 builds it in bf16 (its buffers stay fp32)."""
    spec = PLUGINS[layout.plugin]
    if not spec.casts_model:
        return False
    if layout.precision == "pure_bf16":
        return _zero_stage(layout) == 2  # LowLevelZero is handed bf16 and casts; hybrid_parallel runs at fp32
    return layout.precision in ("bf16", "fp16")


def _zero_stage(layout: Layout) -> int:
    stage = PLUGINS[layout.plugin].zero_stage
    return layout.zero_stage if stage is None else stage


def optimizer_state_bytes(layout: Layout, tensors: list[tuple[int, bool]], shard: int) -> int:
    """The optimizer's own state for these tensors (`shard`: ZeRO's data-parallel split, 1 without), fp32
    masters included where it keeps them. A 4-byte step counter per tensor for the Adam family."""
    spec = OPTIMIZERS[layout.optimizer]
    moments = {"sgd": 0, "inplace_sgd": 0, "collage_light": 3, "collage_plus": 4}.get(layout.optimizer, 2)
    pure = layout.precision == "pure_bf16"
    per_element = 2 * moments if pure or spec.bf16_without_masters else 4 * moments
    # fp32 masters of 16-bit weights where the plugin casts the model (ZeRO, hybrid_parallel; ddp keeps fp32 weights)
    masters = 4 if _plugin_casts(layout) and layout.precision in ("bf16", "fp16") else 0
    total, counters = 0, 0
    for n, matrix in tensors:
        elements = _padded(n, shard) // shard
        if layout.optimizer == "muon" and matrix:
            total += 4 * elements  # one fp32 momentum buffer, no step counter
            continue
        total += (per_element + masters) * elements
        counters += moments > 0
    return total + 4 * counters


def _padded(n: int, shard: int) -> int:
    """LowLevelZero pads each tensor to a multiple of the data-parallel size (the padding is stored)."""
    return math.ceil(n / shard) * shard


def state_bytes(shape: Shape, layout: Layout, stage: int | None = None) -> dict[str, int]:
    """Bytes of weights, gradients and optimizer state on one device of `layout` (pipeline `stage`, or the
    stage holding the most), as `--memory_accounting` counts them (every storage once). With offload the
    optimizer bytes live on the host: they are reported, and `device_bytes` leaves them out."""
    if stage is None:
        totals = [state_bytes(shape, layout, s) for s in range(layout.pp)]
        return max(totals, key=lambda t: sum(t.values()))
    tensors = parameter_tensors(shape, layout.tp, layout.pp, stage)
    zero = _zero_stage(layout)
    shard = layout.dp if zero > 0 else 1
    pure, casts = layout.precision == "pure_bf16", _plugin_casts(layout)
    weight_size = 2 if pure or casts else 4
    grad_size = weight_size
    elements = sum(_padded(n, shard) for n, _ in tensors)
    # ZeRO-1 and up store each weight padded; stage 2 shards gradients, stage 3 (Gemini) the weights too
    # (and its gradients reuse the weights' chunks)
    weights = weight_size * (elements // shard if zero == 3 else elements)
    gradients = {0: grad_size * elements, 1: grad_size * elements, 2: grad_size * elements // shard, 3: 0}[zero]
    if OPTIMIZERS[layout.optimizer].fused_update:
        gradients = 0  # in-place SGD frees each gradient as it applies it
    rotary = shape.head_dim // 2 * (2 if casts else 4)  # inv_freq, a buffer of every stage
    return dict(weights=weights + rotary, gradients=gradients, optimizer=optimizer_state_bytes(layout, tensors, shard))


# ---------------------------------------------------------------------------------------------
# Activations


def layer_kept_elements(shape: Shape, recompute: str, tp: int = 1) -> int:
    """Elements per token one decoder layer keeps from forward to backward (transformers' LLaMA, SDPA).
    none: the layer input, each RMSNorm's normalised input and output (2 x 3h), q and k after rotary and v
    (GQA repeats k and v to h each for SDPA), SDPA's output and its contiguous copy for o_proj (2h), the
    SwiGLU's gate, up, SiLU and product outputs (4 ffn). selective: the input and the matrix products' and
    attention's outputs (q, k, v, attention, o, gate, up, down). full: the input."""
    h, q = shape.hidden, shape.heads * shape.head_dim
    kv = shape.kv_heads * shape.head_dim
    repeated = q if shape.kv_heads != shape.heads else kv  # repeat_kv's copies are what SDPA saves
    if recompute == "full":
        return h
    if recompute == "selective":
        return h + (q + 2 * kv + q) // tp + h + h + 2 * shape.ffn // tp
    return 6 * h + (q + 2 * repeated + 2 * q) // tp + 4 * shape.ffn // tp - h


def activation_size(layout: Layout) -> int:
    """Bytes per activation element: the compute dtype (fp32 on CPU)."""
    return 4 if layout.precision == "fp32" else 2


def in_flight(layout: Layout, microbatches: int, stage: int = 0) -> int:
    """Micro-batches whose activations a pipeline stage holds at once: 1F1B warms up pp - stage of them."""
    return 1 if layout.pp == 1 else min(microbatches, layout.pp - stage)


def activation_bytes(shape: Shape, layout: Layout, seq_len: int, microbatches: int = 1, stage: int = 0) -> int:
    """Peak bytes above the state of one device during forward and backward: the layers of its stage keep
    LAYER_KEPT per token for every micro-batch in flight; the last stage adds the loss head (chunked_loss_bytes,
    or plain_loss_bytes where the plugin runs transformers' own loss); full recompute reruns one layer whole
    during backward. The first stage may peak instead in the embedding's backward (first_stage_bytes)."""
    e = activation_size(layout)
    tokens = layout.microbatch_size * seq_len
    layers = stage_layers(shape, layout.pp)[stage]
    per_microbatch = layers * layer_kept_elements(shape, layout.recompute, layout.tp) * tokens * e
    kept = per_microbatch * in_flight(layout, microbatches, stage)
    rerun = 0
    if layout.recompute != "none":  # backward recomputes one layer's forward (whole for full)
        rerun = layer_kept_elements(shape, "none", layout.tp) - layer_kept_elements(shape, layout.recompute, layout.tp)
        rerun *= tokens * e
    head = 0
    if stage == layout.pp - 1:
        loss = chunked_loss_bytes if PLUGINS[layout.plugin].chunked_loss else plain_loss_bytes
        head = loss(shape, layout, tokens)
    embedding = 0
    if stage == 0:
        # the embedding's backward builds a dense V x h gradient (in the weights' dtype) before adding it into
        # .grad, while the micro-batches forwarded ahead of this one stay kept (1F1B's steady state)
        weight_size = 2 if layout.precision == "pure_bf16" or _plugin_casts(layout) else 4
        embedding = per_microbatch * (in_flight(layout, microbatches, stage) - 1)
        embedding += shape.vocab // layout.tp * shape.hidden * weight_size
    return max(kept + max(rerun, head), embedding)


def plain_loss_bytes(shape: Shape, layout: Layout, tokens: int) -> int:
    """transformers' own loss (hybrid_parallel's shardformer forward, Gemini): log_softmax's fp32 output over
    tokens x V, kept for backward, then in backward nll_loss's gradient and log_softmax's, fp32 each, while that
    output is still held: three fp32 copies of the logits (measured under pp2, fp32; tp's vocabulary-parallel
    cross-entropy is taken as the same over V/tp). Plus the final norm's kept tensors, counted as a layer's
    norms are (3 x tokens x h)."""
    return 3 * 4 * tokens * (shape.vocab // layout.tp) + 3 * tokens * shape.hidden * activation_size(layout)


def chunked_loss_bytes(shape: Shape, layout: Layout, tokens: int) -> int:
    """The chunked loss's peak (loss.py), inside its forward: it holds grad_hidden (tokens x h, plus the
    final norm's kept tensors: 4 x tokens x h in all) and the fp32 grad_weight (V x h) throughout, and per
    chunk either (a) the chunk's logits, logsumexp's temporary of their size and, from the second chunk
    on, the previous chunk's logits (the loop's `grad_logits` still refers to them), or (b) the logits
    and the product `grad_logits.T @ h`, a V x h temporary before it is added into grad_weight (on `small`
    at -l 256, where a chunk's logits are smaller than V x h, (b) is the peak). In 16 bits the logits and
    the product also exist once in the compute dtype before their fp32 copy."""
    e = activation_size(layout)
    vocab = shape.vocab // layout.tp
    chunk = min(tokens, CHUNK_TOKENS)
    logits, product = 4 * chunk * vocab, 4 * vocab * shape.hidden
    cast = 0 if e == 4 else e / 4  # the 16-bit copy next to each fp32 one
    logsumexp = (2 if tokens <= CHUNK_TOKENS else 3) * logits
    weight_gradient = logits * (1 + cast) + product * (1 + cast)
    return int(4 * tokens * shape.hidden * e + product + max(logsumexp, weight_gradient))


# ---------------------------------------------------------------------------------------------
# Communication buffers, the whole device, step time


def communication_bytes(shape: Shape, layout: Layout, seq_len: int) -> int:
    """Buffers the collectives hold: ZeRO's gradient-reduce bucket, Gemini's gathered chunks, a pipeline's
    send/receive buffers of one micro-batch's hidden states."""
    e = activation_size(layout)
    total = 0
    zero = _zero_stage(layout)
    if zero == 3:
        total += GEMINI_CHUNK_BYTES
    elif zero > 0:
        bucket = HYBRID_ZERO_BUCKET_ELEMENTS if PLUGINS[layout.plugin].model_parallel else ZERO_BUCKET_ELEMENTS
        total += 2 * bucket  # 16-bit gradients waiting to be reduced
    if layout.pp > 1:
        total += 2 * layout.microbatch_size * seq_len * shape.hidden * e
    return total


@dataclass(frozen=True)
class Hardware:
    """What the step time is computed from (stated defaults: an 8-GPU H100 SXM node)."""

    peak_tflops: float = 989.0  # dense bf16 per device
    mfu: float = 0.40  # the fraction of it the model's FLOPs reach
    intra_node_gbps: float = 450.0  # GB/s per device inside a node (NVLink)
    inter_node_gbps: float = 50.0  # GB/s per device between nodes (400 Gb/s InfiniBand)
    gpus_per_node: int = 8


def predict(shape, layout: Layout, seq_len: int, global_batch: int, hw: Hardware) -> dict:
    """Peak bytes per device by role (the most loaded pipeline stage) and the step time's parts."""
    microbatches = global_batch // (layout.dp * layout.microbatch_size)
    stages = []
    for stage in range(layout.pp):
        roles = state_bytes(shape, layout, stage)
        if layout.offload:
            roles["optimizer"] = 0  # on the host
        roles["activations"] = activation_bytes(shape, layout, seq_len, microbatches, stage)
        roles["communication"] = communication_bytes(shape, layout, seq_len)
        stages.append(roles)
    roles = max(stages, key=lambda r: sum(r.values()))
    flops = training_flops_per_token(_as_config(shape), seq_len) * global_batch * seq_len
    if layout.recompute == "full":
        flops *= 4 / 3  # forward once more
    compute = flops / (layout.devices * hw.peak_tflops * 1e12 * hw.mfu)
    bubble = compute * (layout.pp - 1) / microbatches if layout.pp > 1 else 0.0
    return dict(
        layout=layout,
        bytes=roles,
        peak_gb=sum(roles.values()) / 1e9,
        microbatches=microbatches,
        step_s=compute + bubble + _communication_seconds(shape, layout, seq_len, global_batch, hw),
        compute_s=compute,
        bubble_s=bubble,
    )


def _communication_seconds(shape: Shape, layout: Layout, seq_len: int, global_batch: int, hw: Hardware) -> float:
    """Ring collectives: an all-reduce moves 2(n-1)/n of the bytes per device, a reduce-scatter or all-gather
    (n-1)/n. Tensor parallelism stays inside a node; data parallelism crosses nodes once dp x tp x pp does."""
    grads = 2 * sum(n for n, _ in parameter_tensors(shape, layout.tp, layout.pp, 0))  # 16-bit gradients
    dp, seconds = layout.dp, 0.0
    crosses = layout.devices > hw.gpus_per_node
    dp_gbps = hw.inter_node_gbps if crosses else hw.intra_node_gbps
    if dp > 1:
        factor = 3 if _zero_stage(layout) == 3 else 2  # ZeRO-3: gather weights for forward and backward, scatter grads
        seconds += factor * (dp - 1) / dp * grads / (dp_gbps * 1e9)
    if layout.tp > 1:  # 4 all-reduces of the hidden states per layer per micro-batch (2 forward, 2 backward)
        tokens = global_batch // dp * seq_len
        moved = 4 * shape.layers // layout.pp * tokens * shape.hidden * 2 * 2 * (layout.tp - 1) / layout.tp
        seconds += moved / (hw.intra_node_gbps * 1e9)
    return seconds


def _as_config(shape: Shape):
    """What metrics.training_flops_per_token reads."""
    from types import SimpleNamespace

    return SimpleNamespace(
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        intermediate_size=shape.ffn,
        vocab_size=shape.vocab,
    )


def candidate_layouts(
    shape: Shape,
    devices: int,
    global_batch: int,
    plugins: list[str],
    precision: str,
    optimizer: str,
    tp: int | None = None,
    pp: int | None = None,
    recompute: str | None = None,
) -> list[Layout]:
    """Every layout of `plugins` that can run: tp divides the heads and stays in a node, pp the layers, the
    batch divides into dp x micro-batches of a power-of-two size; --tp/--pp/--recompute fix those."""
    out = []
    sizes = [1, 2, 4, 8]
    for plugin in plugins:
        model_parallel = PLUGINS[plugin].model_parallel
        for t in [tp] if tp else (sizes if model_parallel else [1]):
            for p in [pp] if pp else ([1, 2, 4, 8, 16] if model_parallel else [1]):
                if devices % (t * p) or shape.heads % t or shape.kv_heads % t or (p > 1 and shape.layers < p):
                    continue
                if not model_parallel and (t > 1 or p > 1):
                    continue
                dp = devices // (t * p)
                if global_batch % dp:
                    continue
                for mode in [recompute] if recompute else ["none", "selective", "full"]:
                    per_replica = global_batch // dp
                    for mbs in [2**i for i in range(per_replica.bit_length()) if per_replica % 2**i == 0]:
                        zeros = [0, 1] if model_parallel else [0]
                        for zero in zeros:
                            if p > 1 and zero > 1 or (zero and precision == "fp32"):
                                continue
                            out.append(
                                Layout(
                                    plugin,
                                    devices,
                                    t,
                                    p,
                                    zero,
                                    mbs,
                                    mode,
                                    precision,
                                    optimizer,
                                    offload=PLUGINS[plugin].offloads_optimizer,
                                )
                            )
    return out


def plan(
    shape: Shape,
    devices: int,
    memory_gb: float,
    seq_len: int,
    global_batch: int,
    plugins: list[str],
    precision: str,
    optimizer: str,
    hw: Hardware,
    **fixed,
) -> list[dict]:
    """The layouts that fit `memory_gb` per device, fastest first."""
    layouts = candidate_layouts(shape, devices, global_batch, plugins, precision, optimizer, **fixed)
    predictions = [predict(shape, layout, seq_len, global_batch, hw) for layout in layouts]
    fits = [p for p in predictions if p["peak_gb"] <= memory_gb]
    return sorted(fits, key=lambda p: (p["step_s"], p["peak_gb"]))


def as_json(prediction: dict) -> dict:
    layout = prediction["layout"]
    return {**{k: v for k, v in prediction.items() if k != "layout"}, "layout": {**asdict(layout), "dp": layout.dp}}


# ---------------------------------------------------------------------------------------------
# The run-start check (trainer.announce)


def unmodelled(cfg) -> str | None:
    """What of this run the planner does not model (the run-start check is then skipped), or None."""
    par = cfg.parallel
    if cfg.model.lora_rank:
        return "LoRA's frozen weights"
    if par.sp_mode:
        return "sequence parallelism"
    if par.pp_style != "1f1b":
        return f"--pp_style {par.pp_style}"
    if not PLUGINS[par.plugin].planned:
        return f"-p {par.plugin}'s placement"
    return None


def fit_warning(cfg, shape: Shape, seq_len: int, devices: int, device_gb: float, plugins: list[str]) -> str | None:
    """One line when this run's predicted peak per device exceeds `device_gb`: the prediction by role and
    the fastest layout of the same devices and batch that fits (of this plugin if one does, else of
    `plugins`), as flags. None when it fits."""
    layout, microbatches = Layout.of(cfg, devices)
    global_batch = layout.dp * layout.microbatch_size * microbatches
    hw = Hardware()
    prediction = predict(shape, layout, seq_len, global_batch, hw)
    if prediction["peak_gb"] <= device_gb:
        return None
    searched = (shape, devices, device_gb, seq_len, global_batch)
    fitting = plan(*searched, [layout.plugin], layout.precision, layout.optimizer, hw) or plan(
        *searched, plugins, layout.precision, layout.optimizer, hw
    )
    roles = ", ".join(
        f"{role} {b / 1e9:.3g}" for role, b in prediction["bytes"].items() if b or role != "communication"
    )
    advice = (
        f"try {layout_flags(fitting[0]['layout'], fitting[0]['microbatches'])}"
        if fitting
        else f"no layout of {devices} devices fits this batch and -l; use more devices or a shorter -l"
    )
    return (
        f"warning: predicted peak {prediction['peak_gb']:.3g} GB per device exceeds this device's {device_gb:.3g} GB "
        f"({roles}): {advice}"
    )


def layout_flags(layout: Layout, microbatches: int) -> str:
    """pretrain.py's flags for `layout` with `microbatches` per step (the same global batch)."""
    flags = [f"-p {layout.plugin}"]
    if PLUGINS[layout.plugin].model_parallel:
        flags.append(f"--tp {layout.tp} --pp {layout.pp} --zero_stage {layout.zero_stage}")
    if layout.pp > 1:  # the pipeline splits -b into micro-batches itself
        flags.append(f"-b {layout.microbatch_size * microbatches} --mbs {layout.microbatch_size}")
    else:
        flags.append(f"-b {layout.microbatch_size} --accumulation_steps {microbatches}")
    return " ".join([*flags, f"--recompute {layout.recompute}"])
