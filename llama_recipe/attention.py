"""Attention: which kernel the model uses, and attention confined to documents in packed rows.

`-a/--flash_attention` asks for flash-attn 2. It needs the `flash-attn` package and a CUDA device;
where either is missing the run falls back to PyTorch SDPA and says so in one line.

`--document_attention` makes every token of a packed row attend only to earlier tokens of its own
document: flash-attn's varlen kernel on GPU (transformers finds the documents from the position
ids), SDPA with the equivalent block-diagonal causal mask elsewhere.
"""

from __future__ import annotations

import importlib.util

import torch

from .distributed import device


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


def segment_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """Document positions with each row's leading segment (a document begun in an earlier row)
    restarted at 0, so that every segment of a row starts at 0. With attention confined to a
    segment this changes nothing (RoPE scores depend only on distances), and it lets kernels find
    segments as "position 0 starts one" without ever joining a row to the previous row."""
    first = position_ids[:, :1]
    leading = torch.cumsum(position_ids == 0, dim=1) == 0  # before the row's first document start
    return torch.where(leading, position_ids - first, position_ids)


def document_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The block-diagonal causal mask of packed rows, as transformers takes a custom 4-D mask:
    shape (batch, 1, seq, seq), 0 where a token may attend and the dtype's minimum elsewhere."""
    document = torch.cumsum(position_ids == 0, dim=1)  # segment index of every token
    same_document = document[:, :, None] == document[:, None, :]
    seq = position_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=position_ids.device).tril()
    allowed = same_document & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def model_inputs(
    batch: dict, attn_implementation: str, document_attention: bool, dtype: torch.dtype, explicit_mask: bool = False
) -> dict:
    """What the model gets from a batch. With `document_attention`, packed rows attend only within
    their own documents: flash-attn 2 reads the segments from the position ids (its varlen kernel),
    SDPA gets the equivalent block-diagonal mask. Otherwise a row is one causal sequence with
    continuous positions, the usual GPT-style packing. `explicit_mask`: always pass a padding mask
    (all ones where nothing is padded), from which transformers builds the (batch, 1, seq, seq) causal
    mask; without one it sizes that mask seq + 1 wide, which shardformer's sequence-parallel attention rejects."""
    inputs = {k: v for k, v in batch.items() if k != "position_ids"}
    if explicit_mask and "attention_mask" not in inputs:
        inputs["attention_mask"] = torch.ones_like(batch["input_ids"])
    if document_attention and "position_ids" in batch:
        inputs["position_ids"] = segment_positions(batch["position_ids"])
        if attn_implementation != "flash_attention_2":
            inputs["attention_mask"] = document_causal_mask(inputs["position_ids"], dtype)
        else:  # with a padding mask, transformers would unpad by it and ignore the documents
            inputs.pop("attention_mask", None)
    return inputs


class ModelInputs:
    """Turns a batch (CPU tensors from the data pipeline) into the model's keyword arguments on the
    device: `model_inputs` with this run's attention kernel, document attention and mask dtype (the
    document mask is added to the scores in the model's dtype)."""

    def __init__(
        self, attn_implementation: str, document_attention: bool, dtype: torch.dtype, explicit_mask: bool = False
    ):
        self.attn_implementation, self.document_attention, self.dtype = attn_implementation, document_attention, dtype
        self.explicit_mask = explicit_mask

    def __call__(self, batch: dict) -> dict:
        on_device = {k: v.to(device(), non_blocking=True) for k, v in batch.items()}
        return model_inputs(
            on_device, self.attn_implementation, self.document_attention, self.dtype, self.explicit_mask
        )
