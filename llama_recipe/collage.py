"""Collage: bf16-only AdamW with multi-component-float error terms, no fp32 master weights.

Yu et al., "Collage: Light-Weight Low-Precision Strategy for LLM Training", ICML 2024 (arXiv 2405.03637);
reference code: github.com/amazon-science/collage (NeMo-GPT/nemo/core/optim/adamw_collage_single_tensor.py).

Plain bf16 AdamW loses updates: bf16 has 8 significand bits, so θ + Δ rounds back to θ whenever |Δ| < ½ ulp(θ)
(an Adam step of ~lr = 3e-4 is far below ½ ulp(1.0) ≈ 3.9e-3), and bf16(0.999) == 1.0, so v ← 0.999·v never
decays. Collage stores a value as a 2-term multi-component float (MCF) x + δx: the head x is the bf16 tensor the
model uses, δx the bf16 rounding error that the head could not hold, which makes later additions land.
- "light": the weights are an MCF (θ, δθ): 10 bytes/param with weight, grad, m, v (plain bf16 AdamW: 8).
- "plus": also the second moment (v, δv), multiplied by β₂ split as bf16 hi + lo: 12 bytes/param.
- "none": plain bf16 AdamW, the baseline. Mixed precision with fp32 master weights and moments costs 16.
Weight decay is "compact": -lr·wd·θ is folded into the update that goes through Grow (a separate bf16 multiply
by 1 - lr·wd ≈ 1 - 1e-5 would round to 1). The MCF multiply here is corrected: the reference MultMC_ aliases
its product with its input (mul_ is in place), so the TwoProd error is lost and the correction counted twice,
which underestimates v by ~40% at β₂ = 0.999; `reference_multiply=True` reproduces it for the paper's runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

COLLAGE_MODES = {"collage_light": "light", "collage_plus": "plus"}  # CLI optimizer name -> mode
MODES = ("none", "light", "plus")
BF16 = torch.bfloat16


# ---------------------------------------------------------------------------------------------------------------
# Error-free transformations on bf16 tensors: a + b == s + e (a * b == p + e) exactly, each output bf16.


def fast2sum(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dekker's Fast2Sum; exact when |a| >= |b| (3 flops)."""
    s = a + b
    return s, b - (s - a)


def two_sum(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Knuth's TwoSum; exact for any order of magnitudes (6 flops)."""
    s = a + b
    a_rounded = s - b
    b_rounded = s - a_rounded
    return s, (a - a_rounded) + (b - b_rounded)


def two_prod(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """p = bf16(a*b) and its error, computed in fp32 where a bf16 x bf16 product is exact.

    The error spans at most the 8 low bits of the 16-bit exact product, so it fits in bf16: exact, barring underflow.
    """
    p = a * b
    e = (a.float() * b.float() - p.float()).to(a.dtype)
    return p, e


def split_bf16(value: float) -> tuple[float, float]:
    """(hi, lo) with hi = bf16(value), lo = bf16(value - hi), in python floats: e.g. 0.999 -> (1.0, -0.001).

    Explicit float64 tensors, so the result does not depend on torch's default dtype (the reference computes
    `beta2 - torch.tensor(beta2).item()`, which only gives the right lo when the default dtype is bf16).
    """
    hi = torch.tensor(value, dtype=torch.float64).to(BF16).item()
    lo = torch.tensor(value - hi, dtype=torch.float64).to(BF16).item()  # value - hi is exact in float64
    return hi, lo


# ---------------------------------------------------------------------------------------------------------------
# In-place MCF operations on (x, δx), written to allocate at most two bf16 temporaries.


def grow_(x: torch.Tensor, dx: torch.Tensor, v: torch.Tensor) -> None:
    """(x, δx) += v in place (Algorithm 1 "Grow"): Fast2Sum(x, v), add its error into δx, renormalise."""
    s = x + v
    e = s.sub(x).neg_().add_(v)  # e = v - (s - x): the part of v that x + v dropped (negation is exact)
    dx.add_(e)  # the one inexact add: a 2-term MCF keeps ~16 significand bits, not the full sum
    torch.add(s, dx, out=x)  # Fast2Sum(s, δ): the head takes what it can of δ ...
    dx.sub_(torch.sub(x, s, out=e))  # ... and δx keeps the rest


def mul_(x: torch.Tensor, dx: torch.Tensor, b_hi: float, b_lo: float, reference: bool = False) -> None:
    """(x, δx) *= (b_hi + b_lo) in place; b_hi, b_lo bf16-representable python floats (see split_bf16).

    Corrected: p, e = TwoProd(x, b_hi); δ = δx·b_hi + x·b_lo + e; (x, δx) = Fast2Sum(p, δ).
    reference=True reproduces amazon-science/collage `MultMC_`, where the product aliases x, so e is computed from
    the product instead of x and the final renormalisation subtracts 0: the correction δ is counted twice.
    """
    # 0-dim bf16 tensors on x's device (filled there: no host-to-device copy): addcmul then evaluates in fp32
    # (opmath on CPU and CUDA), where x·b_hi is exact.
    hi = x.new_full((), b_hi)
    lo = x.new_full((), b_lo)
    if reference:
        x.mul_(hi)
        e = torch.addcmul(-x, x, hi)  # = p·b_hi - p: the aliased "TwoProd error"
        dx.mul_(hi).addcmul_(x, lo).add_(e)
        x.add_(dx)  # δx is not reduced by what the head absorbed
        return
    p = x * b_hi
    e = torch.addcmul(p, x, hi, value=-1).neg_()  # x·b_hi - p exactly (TwoProd)
    dx.mul_(hi).addcmul_(x, lo).add_(e)  # δ, rounded: these are the low-order terms
    torch.add(p, dx, out=x)  # Fast2Sum(p, δ)
    dx.sub_(torch.sub(x, p, out=e))


# ---------------------------------------------------------------------------------------------------------------
# The optimizer.


def edq_metrics(sums: torch.Tensor) -> dict[str, float]:
    """EDQ and imprecision % from CollageAdamW.metric_sums (all-reduced over shards first, if sharded).

    edq = <Δ_eff, Δ> / ||Δ||² (1.0: every intended update landed in the bf16 weights the model uses);
    imprecision_pct = % of elements with Δ != 0 whose bf16 weight did not change. nan when nothing was updated.
    """
    dot, sq_norm, lost, updated = sums.double().tolist()
    return {
        "edq": dot / sq_norm if sq_norm > 0 else math.nan,
        "imprecision_pct": 100.0 * lost / updated if updated > 0 else math.nan,
    }


class CollageAdamW(torch.optim.Optimizer):
    """AdamW on bf16 parameters with Collage MCF error terms ("none", "light" or "plus"), compact weight decay.

    Per-parameter state: "step" (float32 scalar, like torch.optim.AdamW), "exp_avg", "exp_avg_sq",
    "weight_error" (δθ; light and plus), "exp_avg_sq_error" (δv; plus), all bf16 and shaped like the parameter.
    With monitor=True each step() leaves in `metric_sums` (float64, on the parameters' device) the sums
    [<Δ_eff, Δ>, ||Δ||², lost elements, updated elements]; turn them into numbers with edq_metrics().
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        mode: str = "light",
        reference_multiply: bool = False,
        monitor: bool = False,
    ):
        if mode not in MODES:
            raise ValueError(f"CollageAdamW mode must be one of {', '.join(MODES)}, got {mode!r}")
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"CollageAdamW: invalid lr={lr}, betas={betas}, eps={eps} or weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype != BF16:
                    raise ValueError(
                        f"CollageAdamW needs bf16 parameters (it keeps no fp32 master copy), got a {p.dtype} "
                        f"parameter of shape {tuple(p.shape)}: convert the model with model.to(torch.bfloat16) first"
                    )
        self.mode = mode
        self.reference_multiply = reference_multiply
        self.monitor = monitor
        self.metric_sums: torch.Tensor | None = None

    def _state_keys(self) -> tuple[str, ...]:
        return ("step", "exp_avg", "exp_avg_sq") + {
            "none": (),
            "light": ("weight_error",),
            "plus": ("weight_error", "exp_avg_sq_error"),
        }[self.mode]

    def _init_state(self, p: torch.Tensor, state: dict) -> None:
        """Create missing state lazily (also after loading a state_dict saved in another mode)."""
        for key in self._state_keys():
            if key not in state:
                state[key] = torch.tensor(0.0, dtype=torch.float32) if key == "step" else torch.zeros_like(p)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        keep = set(self._state_keys())
        for state in self.state.values():  # drop error terms this mode does not use: they would only cost memory
            for key in [k for k in state if k not in keep]:
                del state[key]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.monitor:
            device = self.param_groups[0]["params"][0].device
            self.metric_sums = torch.zeros(4, dtype=torch.float64, device=device)
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            beta2_hi, beta2_lo = split_bf16(beta2)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("CollageAdamW does not support sparse gradients")
                state = self.state[p]
                self._init_state(p, state)
                self._update(p, state, lr, beta1, beta2, beta2_hi, beta2_lo, eps, wd)
        return loss

    def _update(self, p, state, lr, beta1, beta2, beta2_hi, beta2_lo, eps, wd) -> None:
        grad, exp_avg, exp_avg_sq = p.grad, state["exp_avg"], state["exp_avg_sq"]
        state["step"] += 1
        step = state["step"].item()  # a CPU tensor: no device sync; bias corrections stay python floats
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step

        exp_avg.lerp_(grad, 1 - beta1)
        if self.mode == "plus":
            mul_(exp_avg_sq, state["exp_avg_sq_error"], beta2_hi, beta2_lo, reference=self.reference_multiply)
            grad_sq = torch.zeros_like(grad).addcmul_(grad, grad, value=1 - beta2)  # one rounding, like addcmul_
            grow_(exp_avg_sq, state["exp_avg_sq_error"], grad_sq)
            del grad_sq
        else:
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # bf16: stalls at beta2 = 0.999

        # Δ = -lr/bc1 · m / (sqrt(v)/sqrt(bc2) + eps) - lr·wd·θ  (compact weight decay, uses the head θ only)
        update = p.mul(-lr * wd)
        denom = exp_avg_sq.sqrt().div_(math.sqrt(bias_correction2)).add_(eps)
        update.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
        del denom

        old = p.clone() if self.monitor else None
        if self.mode == "none":
            p.add_(update)
        else:
            grow_(p, state["weight_error"], update)
        if self.monitor:
            self._accumulate_metrics(old, p, update)

    def _accumulate_metrics(self, old: torch.Tensor, new: torch.Tensor, update: torch.Tensor) -> None:
        # fp32 elementwise (the difference of two nearby bf16 values is exact there), float64 sums.
        effective = new.float() - old.float()
        intended = update.float()
        changed = update != 0
        sums = torch.stack(
            [
                torch.sum(effective * intended, dtype=torch.float64),
                torch.sum(intended * intended, dtype=torch.float64),
                (changed & (new == old)).sum().double(),
                changed.sum().double(),
            ]
        )
        self.metric_sums += sums.to(self.metric_sums.device)
