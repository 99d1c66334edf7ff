"""What the training state occupies on each rank, in Megatron's terms: bytes per parameter of the
weights, the gradients and the optimizer state (master weights and moments), measured by counting
every tensor the boosted model and optimizer reach, next to the figures Megatron's distributed
optimizer documents (docs/source/api-guide/dist_optimizer.md, d = data-parallel size):

| weights, gradients | without the distributed optimizer | with it |
|---|---|---|
| fp16, fp16 (fp32 master and main grads) | 20 | 4 + 16/d |
| bf16, fp32 | 18 | 6 + 12/d |
| fp32, fp32 | 16 | 8 + 8/d |

ZeRO-1 inside hybrid_parallel is the distributed optimizer's layout: the fp32 masters and Adam moments
sharded over the data-parallel group, the 16-bit weights and gradients whole on every rank.

The table counts Adam's two fp32 moments (8 bytes per parameter). --optimizer muon keeps one fp32 momentum
buffer (4 bytes) for the hidden matrices and AdamW's 8 for the embeddings, output layer and norms: measured
here, 7.81 bytes of optimizer state per parameter for tiny4 (whose 4.3M are mostly embeddings), 6.24 for
small, and 4.16 by count for llama2-7b (96% of it hidden matrices), against AdamW's 8.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .config import TrainConfig
from .data import SyntheticBatches
from .metrics import reachable_tensors
from .model import count_parameters, get_model_config
from .parallel import build_parallelism
from .trainer import build_boosted, forward_backward

MEGATRON_BYTES = {  # precision -> (bytes per parameter without, (constant, sharded part) with the distributed optimizer)
    "fp16": (20, (4, 16)),
    "bf16": (18, (6, 12)),
    "fp32": (16, (8, 8)),
}


def bytes_by_role(model: torch.nn.Module, optimizer) -> dict[str, int]:
    """Bytes of the model's weights and buffers, of every gradient (the parameters' .grad and what ZeRO's
    gradient stores hold: metrics.GRADIENT_ATTRIBUTES), and of the rest the optimizer reaches (master
    weights, moments, loss scale). Each storage counted once."""
    totals = {"weights": 0, "gradients": 0, "optimizer": 0}
    for t, role in reachable_tensors((model, "weights"), (optimizer, "optimizer")):
        totals[role] += t.untyped_storage().nbytes()
    return totals


def state_memory(cfg: TrainConfig) -> dict:
    """Build and boost the model as training does, take one step (so the optimizer state exists) and one more
    forward/backward (so the gradients do), and report this rank's bytes per parameter of its model-parallel
    share, by role, with Megatron's figures for this precision and data-parallel size. Needs the process group."""
    par = build_parallelism(cfg)
    model_config = get_model_config(cfg.model.config)
    model, optimizer, _ = build_boosted(cfg, par, model_config, "sdpa", warmup_steps=0, total_steps=10)
    seq_len = cfg.data.max_length or 128
    batches = SyntheticBatches(model_config.vocab_size, seq_len, cfg.training.batch_size, seed=cfg.training.seed)
    forward_backward(par, model, optimizer, batches, 1, inputs=lambda batch: batch)
    par.step(optimizer)
    optimizer.zero_grad()
    forward_backward(par, model, optimizer, batches, 1, inputs=lambda batch: batch)
    model_parallel = dist.get_world_size() // par.dp_size
    share = count_parameters(model_config) / model_parallel  # the parameters this rank's replica slice holds
    counted = bytes_by_role(model, optimizer)
    measured = {role: n / share for role, n in counted.items()}
    megatron = MEGATRON_BYTES.get(par.precision)  # None for pure_bf16: Megatron's table has no row for it
    return dict(
        bytes=counted,  # what the planner predicts (planner.state_bytes)
        bytes_per_parameter=measured,
        total_bytes_per_parameter=sum(measured.values()),
        megatron_without_distributed_optimizer=megatron and megatron[0],
        megatron_distributed_optimizer=megatron and megatron[1][0] + megatron[1][1] / par.dp_size,
        dp_size=par.dp_size,
    )
