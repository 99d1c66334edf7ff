"""LOMO / CoLLiE "in-place SGD" (Lv et al., arXiv 2306.09782): SGD fused into the backward pass.

Each parameter is updated the moment its gradient is complete and the gradient is freed at once, so the gradients of
the whole model never exist together: gradient memory is about one parameter's worth, and SGD keeps no state.
We use `Tensor.register_post_accumulate_grad_hook`, which fires after `.grad` is written, so every hook updates its
own parameter in O(1); LOMO's tensor hooks fire before accumulation and had to rescan all parameters (O(P^2) per
step) plus make a trailing call for the last one. Clipping by the global gradient norm needs the norm before the
first update, so `fused_backward` then runs backward twice on one graph: pass 1 only measures the norm (and spots
fp16 overflow), pass 2 updates with the clip coefficient. That costs about one extra backward per step. Dynamic
loss scaling is for fp16 only (bf16 and fp32 have fp32's exponent range and need none); an overflow skips the step.
Gradient accumulation is impossible (the update happens inside every backward) and so is pipeline parallelism
(its micro-batches are accumulation). Data parallelism: pass `process_group`; each hook all-reduces its gradient
(synchronously, unbucketed, in fp32) before using it, so every rank makes the same update. Keep the backward out of
torch DDP's reducer, which needs `.grad` to stay alive in its buckets: best a plain model with weights broadcast
from rank 0 (DDP's buckets alone hold a full gradient's worth of memory), else forward + `fused_backward` inside
`ddp_model.no_sync()`. Tensor parallelism (CoLLiE's InplaceTensorTrainer): pass `tensor_parallel_group` and
`is_sharded`; each rank updates its own shards, and the clipping norm sums the shards' squares over the group and
counts replicated weights once. Weights are stored back in their own dtype with no fp32 master copy, so in bf16/fp16
updates smaller than half an ulp of the weight are lost (the paper accepts this).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist

_SCALER_KEY = "loss_scaler"  # where state_dict() keeps the loss scaler's state: see state_dict()


class DynamicLossScaler:
    """fp16 loss scale: halve on overflow (not below min_scale), double after `window` consecutive clean steps."""

    def __init__(self, init_scale: float = 2.0**16, factor: float = 2.0, window: int = 1000, min_scale: float = 1.0):
        if factor <= 1.0 or window < 1 or not (0 < min_scale <= init_scale):
            raise ValueError(f"bad loss scaler settings: {init_scale=} {factor=} {window=} {min_scale=}")
        self.scale = float(init_scale)
        self.factor = factor
        self.window = window
        self.min_scale = float(min_scale)
        self.clean_steps = 0  # consecutive steps without overflow since the last change of scale

    def update(self, overflow: bool) -> None:
        if overflow:
            self.scale = max(self.scale / self.factor, self.min_scale)
            self.clean_steps = 0
            return
        self.clean_steps += 1
        if self.clean_steps >= self.window:
            self.scale *= self.factor
            self.clean_steps = 0

    def state_dict(self) -> dict[str, float | int]:
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])


class InplaceSGD(torch.optim.Optimizer):
    """SGD (decoupled weight decay, global-norm clipping, optional fp16 loss scaling) applied inside backward.

    Call `fused_backward(loss)` instead of `loss.backward()` + `optimizer.step()`. `step()` is a no-op kept so that
    LR schedulers, wrappers and checkpoint code treat this as an optimizer; schedulers edit `group["lr"]`, which the
    hooks read at update time. Outside `fused_backward` the hooks do nothing, so a plain `loss.backward()` still
    leaves ordinary gradients.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        weight_decay: float = 0.0,
        max_norm: float = 0.0,
        loss_scaler: DynamicLossScaler | None = None,
        process_group: dist.ProcessGroup | None = None,
        tensor_parallel_group: dist.ProcessGroup | None = None,
        is_sharded: Callable[[torch.Tensor], bool] | None = None,
        hooks_now: bool = True,
    ):
        if lr < 0 or weight_decay < 0 or max_norm < 0:
            raise ValueError(f"lr, weight_decay and max_norm must be >= 0; got {lr=} {weight_decay=} {max_norm=}")
        # Set before super().__init__, which calls add_param_group (and so registers the hooks).
        self.max_norm = float(max_norm)
        self._loss_scaler = loss_scaler
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group) if process_group is not None else 1
        # Tensor parallelism: each rank holds a shard of the split weights (is_sharded) and a whole copy of the
        # others; the global norm sums the shards' squares over the group and counts each replicated weight once.
        self.tensor_parallel_group = tensor_parallel_group
        self._is_sharded = is_sharded or (lambda p: False)
        # False: no hooks until attach_hooks(), for parameters that cannot take one yet (ColossalAI's lazy tensors)
        self._hooks_now = hooks_now
        self.skipped = False  # whether the last fused_backward skipped its update (non-finite gradient norm)
        self.last_grad_norm: float | None = None  # what the last fused_backward returned
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._mode: str | None = None  # None (hooks idle), "norm" (pass 1) or "update"
        self._norms: dict[tuple[int, int], torch.Tensor] = {}  # (group, index) -> fp32 norm, filled in pass 1
        self._coef: torch.Tensor | None = None  # clip coefficient for pass 2; None: no clipping
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group_index = len(self.param_groups)
        super().add_param_group(param_group)
        # The hook holds only a weak reference to the optimizer: param -> hook -> optimizer -> param would be a
        # cycle through autograd's C++ side that the garbage collector cannot see. If the optimizer is gone, the
        # hooks do nothing and backward leaves ordinary gradients again.
        optimizer_ref = weakref.ref(self)
        for index, p in enumerate(self.param_groups[group_index]["params"]):
            if not p.requires_grad or not self._hooks_now:
                continue

            def hook(param: torch.Tensor, key: tuple[int, int] = (group_index, index)) -> None:
                optimizer = optimizer_ref()
                if optimizer is not None:
                    optimizer._on_grad_ready(param, key)

            self._handles.append(p.register_post_accumulate_grad_hook(hook))

    def attach_hooks(self) -> None:
        """Hook the parameters the groups hold now: a plugin that shards the model (ColossalAI's shardformer)
        builds them after this optimizer, from lazy tensors that take no hooks."""
        self.remove_hooks()
        self._hooks_now = True
        groups, self.param_groups = self.param_groups, []
        for group in groups:
            self.add_param_group(group)

    def remove_hooks(self) -> None:
        """Detach from the parameters: afterwards backward leaves ordinary gradients and fused_backward refuses."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @torch.no_grad()
    def _on_grad_ready(self, p: torch.Tensor, key: tuple[int, int]) -> None:
        if self._mode is None:
            return
        grad = p.grad
        p.grad = None  # free it now: this is the whole point
        if self.world_size > 1:
            # Reduce in fp32: a sum of fp16 gradients can overflow and a bf16 sum loses bits. Synchronous and
            # per parameter (no bucketing), which is simple but leaves communication un-overlapped.
            grad = grad.float()
            dist.all_reduce(grad, group=self.process_group)
            grad.div_(self.world_size)
        grad = grad.float()  # a no-op for fp32 gradients, which we then modify in place: nobody else holds them
        if self._loss_scaler is not None:
            grad.div_(self._loss_scaler.scale)  # a power of two: exact
        if self._mode == "norm":
            self._norms[key] = torch.linalg.vector_norm(grad)  # a non-finite gradient gives a non-finite norm
            return
        group = self.param_groups[key[0]]
        lr, weight_decay = group["lr"], group["weight_decay"]
        if self._coef is not None:
            grad.mul_(self._coef)
        # fp32 arithmetic whatever p's dtype; for fp32 p, .float() is p itself and it updates in place. Through
        # .data (as LOMO does), which leaves p's version counter alone: every use of p in this graph has run its
        # backward by now, and parameters materialised by ColossalAI's lazy init can share one counter, so another
        # parameter's update would otherwise fail autograd's check on a tensor nothing changed.
        weight = p.data
        p_fp32 = weight.float()
        if weight_decay != 0:
            p_fp32.mul_(1.0 - lr * weight_decay)
        p_fp32.add_(grad, alpha=-lr)
        if p_fp32 is not weight:
            weight.copy_(p_fp32)

    def _run_pass(self, mode: str, loss: torch.Tensor, retain_graph: bool) -> None:
        self._mode = mode
        try:
            loss.backward(retain_graph=retain_graph)
        finally:
            self._mode = None

    def fused_backward(self, loss: torch.Tensor) -> float | None:
        """Backward and SGD update in one go; returns the global gradient norm before clipping, if computed.

        The norm is of the averaged (across `process_group`), unscaled gradients; it is computed when `max_norm > 0`
        or a loss scaler is set, and then costs a second backward. A non-finite norm skips the update (weights
        unchanged, `self.skipped = True`, the loss scale halves) and is returned as is.
        """
        if not self._handles:
            raise RuntimeError("InplaceSGD.fused_backward after remove_hooks(): the hooks that do the update are gone")
        if any(p.grad is not None for group in self.param_groups for p in group["params"]):
            raise RuntimeError(
                "InplaceSGD.fused_backward called while parameters already hold .grad: the update is fused into "
                "backward, so gradient accumulation is impossible; run exactly one fused_backward per step and no "
                "plain loss.backward() (or call zero_grad() first to drop those gradients)"
            )
        self.skipped = False
        self.last_grad_norm = None
        scaler = self.loss_scaler
        scaled_loss = loss * scaler.scale if scaler is not None else loss
        if self.max_norm == 0 and scaler is None:
            self._coef = None
            self._run_pass("update", scaled_loss, retain_graph=False)
            return None

        # Pass 1: only the norm (every hook also frees its gradient, so memory stays as low as in pass 2).
        self._norms = {}
        self._run_pass("norm", scaled_loss, retain_graph=True)
        # Stacked in parameter order, as torch.nn.utils.clip_grad_norm_ does, so the sum rounds the same way.
        total = self._global_norm()
        norm = total.item()
        if not math.isfinite(norm):
            self.skipped = True
            if scaler is not None:
                scaler.update(overflow=True)
            self.last_grad_norm = norm
            return norm
        # Kept a 0-d fp32 tensor, computed as clip_grad_norm_ does, so updates match torch bit for bit.
        self._coef = torch.clamp(self.max_norm / (total + 1e-6), max=1.0) if self.max_norm > 0 else None

        # Pass 2: the same gradients again (the graph was kept), now with updates.
        try:
            self._run_pass("update", scaled_loss, retain_graph=False)
        finally:
            self._coef = None
        if scaler is not None:
            scaler.update(overflow=False)
        self.last_grad_norm = norm
        return norm

    def _global_norm(self) -> torch.Tensor:
        """The norm over all parameters (and, with tensor parallelism, over all their shards) of pass 1's norms."""
        keys, norms = sorted(self._norms), self._norms
        self._norms = {}
        if self.tensor_parallel_group is None:
            # Stacked in parameter order, as torch.nn.utils.clip_grad_norm_ does, so the sum rounds the same way.
            return torch.linalg.vector_norm(torch.stack([norms[k] for k in keys])) if keys else torch.zeros(())
        # [sum over sharded weights, sum over replicated ones], on the gradients' device (NCCL reduces device tensors)
        squares = torch.zeros(2, device=norms[keys[0]].device) if keys else torch.zeros(2)
        for group_index, index in keys:
            sharded = self._is_sharded(self.param_groups[group_index]["params"][index])
            squares[0 if sharded else 1] += norms[(group_index, index)].square()
        dist.all_reduce(squares[:1], group=self.tensor_parallel_group)  # every shard once; replicated: ours only
        return squares.sum().sqrt()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """No-op: the update already happened in fused_backward. A closure, if given, is called and its loss returned."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    # Plain SGD has no per-parameter state; the loss scaler's state rides along inside param group 0. A top-level
    # key would be dropped by checkpoint code that saves only "state" and "param_groups" (ColossalAI's sharded
    # optimizer checkpoints do), while group keys survive every path that restores param groups.
    # Loading copies that key into the live group 0 (torch's load_state_dict, and ColossalAI's sharded load, which
    # replaces param_groups directly); the `loss_scaler` property moves it into the scaler on the next access.
    def state_dict(self) -> dict[str, Any]:
        scaler = self.loss_scaler
        state = super().state_dict()
        if scaler is not None:
            state["param_groups"][0] = {**state["param_groups"][0], _SCALER_KEY: scaler.state_dict()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        _ = self.loss_scaler  # absorb the scaler state now

    @property
    def loss_scaler(self) -> DynamicLossScaler | None:
        """The scaler, first absorbing any saved scaler state that a checkpoint load left in param group 0."""
        groups = self.__dict__.get("param_groups")
        saved = groups[0].pop(_SCALER_KEY, None) if groups else None
        if saved is not None and self._loss_scaler is not None:
            self._loss_scaler.load_state_dict(saved)
        return self._loss_scaler
