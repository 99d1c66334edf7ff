"""Progress bar and TensorBoard scalars, on rank 0 only."""

from __future__ import annotations

import resource

import torch
from tqdm import tqdm


def peak_memory_mb() -> float:
    """Peak device memory of this process: CUDA allocations on GPU, resident set size on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class MetricsLogger:
    def __init__(self, enabled: bool, tensorboard_dir: str | None, total_steps: int, start_step: int, desc: str):
        self.enabled = enabled
        self.bar = tqdm(
            total=total_steps, initial=start_step, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True
        )
        self.writer = None
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(tensorboard_dir)

    def log_step(
        self, step: int, loss: float, lr: float, grad_norm: float | None, tokens_per_s: float, write: bool
    ) -> None:
        if not self.enabled:
            return
        self.bar.update(1)
        if not write:
            return
        memory = peak_memory_mb()
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", mem_mb=f"{memory:,.0f}")
        if self.writer is not None:
            scalars = {"loss": loss, "lr": lr, "tokens_per_s": tokens_per_s, "peak_memory_mb": memory}
            if grad_norm is not None:
                scalars["grad_norm"] = grad_norm
            for name, value in scalars.items():
                self.writer.add_scalar(f"train/{name}", value, step)

    def print(self, message: str) -> None:
        if self.enabled:
            self.bar.write(message)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
