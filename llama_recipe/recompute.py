"""Activation recompute: how much of the forward pass backward recomputes instead of keeping.

- `full` (also `-g`): every decoder layer keeps only its input and reruns its forward in backward.
- `selective`: op-level selective checkpointing (torchtitan's policy family): each decoder layer
  keeps the outputs of its matrix products and of attention, and recomputes the cheap ops between
  them (RMSNorm, rotary embeddings, SiLU and the gating product, reshapes). Megatron's
  `--recompute-granularity selective` instead recomputes only the attention core (QK^T, softmax,
  dropout, x V), which pays off where those seq^2 tensors are stored; SDPA and flash attention never
  store them. Measured on `small` cut from its 8 layers to 2 (-l 1024, CPU, SDPA): core-attention
  recompute keeps 80 of the 84 MiB of layer activations, this policy 46 MiB, full recompute none
  (docs/benchmarks.md).
  It also runs under shardformer, which replaces the attention forward (an attention-level wrapper
  would be bypassed there): ColossalAI's LLaMA forward calls the checkpoint function we give HF.
- `none`.

Both use non-reentrant checkpointing (`use_reentrant=False`): transformers 4.51 defaults to the
reentrant variant, which cannot take a selective policy and drops gradients of inputs that do not
require grad. Gradients are bit-identical to no recompute (tests/test_recompute.py).
"""

from __future__ import annotations

from functools import partial

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

RECOMPUTE_MODES = ["full", "selective", "none"]

_aten = torch.ops.aten
# The products worth keeping: matrix multiplies and the attention kernels (every SDPA backend).
KEPT_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
}
# Collectives (tensor and sequence parallelism) are kept too: recomputing one would repeat the communication,
# and an in-place collective replayed by the selective-checkpoint cache gives wrong gradients (measured under tp2).
KEPT_OPS |= {
    getattr(torch.ops.c10d, name).default
    for name in [
        "allreduce_",
        "allgather_",
        "_allgather_base_",
        "reduce_scatter_",
        "_reduce_scatter_base_",
        "alltoall_",
        "alltoall_base_",
        "broadcast_",
    ]
}


def recompute_mode(model_cfg) -> str:
    """--recompute, or full with -g (or with a per-stage layer count), else none."""
    if model_cfg.recompute:
        return model_cfg.recompute
    return "full" if model_cfg.grad_checkpoint or model_cfg.recompute_layers_per_stage else "none"


def keep_products(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """The selective policy: keep matrix products and attention outputs, recompute everything else."""
    return CheckpointPolicy.MUST_SAVE if op in KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def enable_recompute(model: torch.nn.Module, mode: str) -> None:
    """Turn on `mode` for a transformers model (before the plugin wraps it)."""
    if mode == "none":
        return
    kwargs: dict = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, keep_products)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
