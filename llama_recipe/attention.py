"""Which attention kernel the model uses.

`-a/--flash_attention` asks for flash-attn 2. It needs the `flash-attn` package and a CUDA device;
where either is missing the run falls back to PyTorch SDPA and says so in one line.
"""

from __future__ import annotations

import importlib.util

import torch


def flash_attn_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def select_attention(flash_requested: bool) -> tuple[str, str | None]:
    """Return (transformers attn_implementation, a message for the user or None)."""
    if not flash_requested:
        return "sdpa", None
    if not torch.cuda.is_available():
        return "sdpa", "flash attention needs a CUDA device; this run uses PyTorch SDPA attention instead"
    if importlib.util.find_spec("flash_attn") is None:
        return (
            "sdpa",
            "flash-attn is not installed (pip install -r requirements-gpu.txt); this run uses PyTorch SDPA attention instead",
        )
    return "flash_attention_2", None
