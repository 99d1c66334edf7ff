"""Optimizers and the learning-rate schedule: AdamW with LLaMA's betas (0.9, 0.95) and its schedule's
shape, linear warmup then cosine decay to 10% of the peak learning rate (weight decay 0.1 and clipping
at 1.0 are config.py's defaults, as in the paper); or warmup-stable-decay (WSD), or a constant lr. Epsilon is --adam_eps: Llama 2's 1e-5 for
pretraining (LLaMA 1 gives none); finetuning keeps the Adam optimizers' own default, 1e-8.

Besides AdamW: ColossalAI's HybridAdam (Gemini needs it), Collage (bf16 AdamW without fp32 master
weights, collage.py), plain SGD, and in-place SGD (LOMO: the update fused into the backward pass,
inplace_sgd.py) for finetuning with the least memory, and Muon (MuonAdamW below) for pretraining.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from .collage import COLLAGE_MODES, CollageAdamW
from .config import OptimConfig
from .errors import UsageError
from .inplace_sgd import DynamicLossScaler, InplaceSGD


@dataclass(frozen=True)
class OptimizerSpec:
    """What the rest of the recipe must know about an optimizer."""

    bf16_without_masters: bool = False  # keeps bf16 weights and states, no fp32 copy: needs -x pure_bf16
    fused_update: bool = False  # updates each weight inside the backward pass (needs whole gradients)
    fp32_states: bool = False  # always keeps fp32 states, so it cannot train pure bf16
    monitored: bool = False  # can report --log_edq metrics
    whole_matrices: bool = False  # orthogonalises each weight matrix, so every rank must hold whole ones


OPTIMIZERS = {
    "adamw": OptimizerSpec(),
    "hybrid_adam": OptimizerSpec(fp32_states=True),
    "collage_light": OptimizerSpec(bf16_without_masters=True, monitored=True),
    "collage_plus": OptimizerSpec(bf16_without_masters=True, monitored=True),
    "sgd": OptimizerSpec(),
    "inplace_sgd": OptimizerSpec(fused_update=True),
    "muon": OptimizerSpec(whole_matrices=True),
}
OPTIMIZER_NAMES = list(OPTIMIZERS)
BETA1 = 0.9  # LLaMA's AdamW betas were (0.9, 0.95); --beta2 sets the second
FINAL_LR_FRACTION = 0.1


def parameter_groups(model: nn.Module | list[nn.Parameter], weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: decaying RMSNorm gains (and biases) toward zero hurts training."""
    params = model.parameters() if isinstance(model, nn.Module) else model
    decay, no_decay = [], []
    for param in params:
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    name: str,
    model: nn.Module,
    lr: float,
    weight_decay: float,
    *,
    beta2: float = 0.95,
    eps: float = 1e-8,
    max_norm: float = 0.0,
    fp16_loss_scaling: bool = False,
    process_group=None,
    tensor_parallel_group=None,
    is_sharded=None,
    reference_multiply: bool = False,
    monitor: bool = False,
) -> torch.optim.Optimizer:
    """The optimizer named by --optimizer. The keyword arguments matter only to some: inplace_sgd clips
    (`max_norm`), scales an fp16 loss and all-reduces gradients (`process_group`) itself, because it
    updates during backward where no plugin can step in; Collage takes `reference_multiply` and `monitor`.
    `eps` goes to every Adam variant (SGD has none); its default is theirs, the recipe passes --adam_eps."""
    groups, betas = parameter_groups(model, weight_decay), (BETA1, beta2)
    if name in ("collage_light", "collage_plus"):
        mode = COLLAGE_MODES[name]
        return CollageAdamW(
            groups, lr=lr, betas=betas, eps=eps, mode=mode, reference_multiply=reference_multiply, monitor=monitor
        )
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr)
    if name == "inplace_sgd":
        scaler = DynamicLossScaler() if fp16_loss_scaling else None
        return InplaceSGD(
            groups,
            lr=lr,
            max_norm=max_norm,
            loss_scaler=scaler,
            process_group=process_group,
            tensor_parallel_group=tensor_parallel_group,
            is_sharded=is_sharded,
            hooks_now=False,
        )
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    if name == "muon":
        return MuonAdamW(model, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
    if name == "hybrid_adam":
        # ColossalAI's fused Adam (CUDA kernel on GPU, CPU kernel for offloaded states); adamw_mode=True
        # makes it decoupled-weight-decay AdamW. On a CPU-only machine it JIT-compiles once (~2.5 min).
        from colossalai.nn.optimizer import HybridAdam

        return HybridAdam(groups, lr=lr, betas=betas, eps=eps, adamw_mode=True)
    raise UsageError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZER_NAMES)}")


class MuonAdamW(torch.optim.Optimizer):
    """Muon (torch.optim.Muon: Nesterov momentum orthogonalised by Newton-Schulz) for the hidden matrices,
    the attention and MLP projections; AdamW for the embeddings, the output layer and the norms, which Muon
    is not meant for. Muon scales its update with "match_rms_adamw" (Moonlight, arXiv 2502.16982): 0.2 *
    sqrt(max(rows, cols)) times the lr, so its update's RMS is AdamW's and both parts take --lr and
    --weight_decay as tuned for AdamW.

    One optimizer, not two side by side, so that the lr schedule, the plugins' wrappers and checkpointing
    see ordinary param_groups and state: each group says which half updates it ("muon": True or False).
    step() hands each half its groups and this optimizer's state every time, because load_state_dict
    (ours, or a plugin's checkpoint IO) replaces both objects."""

    def __init__(self, model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float):
        hidden, other = hidden_matrices(model)
        self._muon = torch.optim.Muon(
            [{"params": hidden}], lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw"
        )
        self._adamw = torch.optim.AdamW(parameter_groups(other, weight_decay), lr=lr, betas=betas, eps=eps)
        for half, muon in ((self._muon, True), (self._adamw, False)):
            for group in half.param_groups:
                group["muon"] = muon
        # the groups keep every hyperparameter their half reads, filled in by its constructor
        super().__init__(self._muon.param_groups + self._adamw.param_groups, {})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for half, muon in ((self._muon, True), (self._adamw, False)):
            half.param_groups = [group for group in self.param_groups if group["muon"] is muon]
            half.state = self.state  # keyed by parameter, and the halves' parameters are disjoint
            half.step()
        return loss


def hidden_matrices(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(the 2-D weights inside the decoder layers, every other trainable parameter). The embeddings and the
    output layer are matrices too, but each row is a token, not a direction Muon should orthogonalise."""
    outer = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) for p in m.parameters()}
    hidden, other = [], []
    for param in model.parameters():
        if param.requires_grad:
            (hidden if param.ndim == 2 and id(param) not in outer else other).append(param)
    return hidden, other


# Not transformers' get_cosine_with_min_lr_schedule_with_warmup: its warmup starts at factor 0 (a wasted first
# update) and its floor comes after the last update; shifted a step, it holds the peak for one update, ours two.
def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak lr for the update numbered `step` (0-based): (step + 1) / warmup_steps
    during warmup, then a cosine from 1 down to FINAL_LR_FRACTION, which the last update gets."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps - 1)  # the last update (total_steps - 1) gets the floor
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return FINAL_LR_FRACTION + (1.0 - FINAL_LR_FRACTION) * cosine


LR_SCHEDULES = ["cosine", "wsd", "constant"]
# WSD's decay shapes: from 1 at progress 0 to 0 at progress 1. 1-sqrt is Hägele et al.'s (2024) cooldown,
# which matched a cosine's final loss where linear fell short.
DECAY_SHAPES: dict[str, Callable[[float], float]] = {
    "1-sqrt": lambda progress: 1.0 - math.sqrt(progress),
    "linear": lambda progress: 1.0 - progress,
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
}


@dataclass(frozen=True)
class LRSchedule:
    """--lr_schedule over a run of `total_steps` updates, each starting with linear warmup. cosine:
    `warmup_cosine_factor`. constant: the peak held to the end. wsd (warmup-stable-decay): the peak
    held, then over the last `decay_steps` updates `decay_shape` down to FINAL_LR_FRACTION, which the
    last update gets; a checkpoint of the stable phase can branch into a decay (--reset_schedule)."""

    kind: str
    warmup_steps: int
    total_steps: int
    decay_fraction: float = 1.0  # wsd: the share of the updates that decay (the config's flag sets it)
    decay_shape: str = "linear"

    @classmethod
    def of(cls, opt: OptimConfig, warmup_steps: int, total_steps: int) -> LRSchedule:
        """The run's schedule from its flags; a wsd decay that does not fit the run is a UsageError."""
        schedule = cls(opt.lr_schedule, warmup_steps, total_steps, opt.decay_fraction, opt.decay_shape)
        if problem := schedule.problem():
            raise UsageError(problem)
        return schedule

    @property
    def decay_steps(self) -> int:
        """wsd: the updates whose lr decays, decay_fraction of all rounded to the nearest (at least one)."""
        return max(1, round(self.decay_fraction * self.total_steps))

    def factor(self, step: int) -> float:
        """Multiplier of the peak lr for the update numbered `step` (0-based)."""
        if self.kind == "cosine":
            return warmup_cosine_factor(step, self.warmup_steps, self.total_steps)
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        into_decay = step - (self.total_steps - self.decay_steps) + 1  # 1 on the first decaying update
        if self.kind == "constant" or into_decay <= 0:
            return 1.0
        progress = min(1.0, into_decay / self.decay_steps)  # (the last update: 1, the floor)
        return FINAL_LR_FRACTION + (1.0 - FINAL_LR_FRACTION) * DECAY_SHAPES[self.decay_shape](progress)

    def problem(self) -> str | None:
        if self.kind == "wsd" and self.warmup_steps + self.decay_steps > self.total_steps:
            return (
                f"--lr_schedule wsd: {self.warmup_steps} warmup steps and {self.decay_steps} decay steps "
                f"(--decay_fraction {self.decay_fraction:g}) do not fit in the run's {self.total_steps} steps; "
                "lower --decay_fraction or the warmup (-s/--warmup_steps, --warmup_ratio), or train longer"
            )
        return None

    def describe(self) -> str:
        """The phases in updates, e.g. `wsd: 10 warmup, 70 stable, 20 decay (1-sqrt) to 10% of --lr`."""
        if self.kind == "constant":
            return f"constant: {self.warmup_steps} warmup, then the peak for {self.total_steps} steps in all"
        if self.kind == "cosine":
            return f"cosine: {self.warmup_steps} warmup, then a cosine to {FINAL_LR_FRACTION:.0%} of --lr"
        stable = self.total_steps - self.warmup_steps - self.decay_steps
        return (
            f"wsd: {self.warmup_steps} warmup, {stable} stable, {self.decay_steps} decay ({self.decay_shape}) "
            f"to {FINAL_LR_FRACTION:.0%} of --lr"
        )


def finetune_warmup_steps(warmup_ratio: float, total_steps: int) -> int:
    """finetune.py's warmup: --warmup_ratio of the run's updates, rounded up."""
    return math.ceil(warmup_ratio * total_steps)


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, schedule: LRSchedule | None = None
) -> LambdaLR:
    """The schedule as torch's LambdaLR (its state, the step count, is what checkpoints keep); `schedule`
    None: warmup_cosine_factor."""
    schedule = schedule or LRSchedule("cosine", warmup_steps, total_steps)
    return LambdaLR(optimizer, schedule.factor)
