"""Activation recompute (llama_recipe/recompute.py): selective and full recompute give the gradients of
no recompute bit for bit, and keep less memory between forward and backward.

Memory is measured as the bytes the forward pass leaves allocated (the profiler's allocation record,
summed). Saved-tensor hooks cannot measure selective recompute: the tensors its policy keeps are
stored by the checkpoint itself, past any outer hook, so the hooks would report full recompute's
number for it."""

from __future__ import annotations

import pytest
import torch

from llama_recipe.config import TrainConfig
from llama_recipe.recompute import enable_recompute, recompute_mode


def llama(mode: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    enable_recompute(model, mode)
    return model.train()


def kept_by_forward(model, ids) -> tuple[torch.Tensor, int]:
    """The loss, and the bytes the forward pass left allocated (activations kept for backward, and the loss)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = model(input_ids=ids, labels=ids).loss
    return loss, sum(event.self_cpu_memory_usage for event in prof.events())


def test_selective_and_full_recompute_keep_less_and_give_the_same_gradients():
    ids = torch.randint(0, 256, (2, 256), generator=torch.Generator().manual_seed(1))
    kept, grads = {}, {}
    for mode in ["none", "selective", "full"]:
        model = llama(mode)
        loss, kept[mode] = kept_by_forward(model, ids)
        loss.backward()
        grads[mode] = [p.grad for p in model.parameters()]
    for mode in ["selective", "full"]:
        assert all(torch.equal(a, b) for a, b in zip(grads["none"], grads[mode], strict=True)), mode
    layers = kept["none"] - kept["full"]  # what the decoder layers keep without recompute (full keeps their inputs)
    assert layers > 0.3 * kept["none"], kept
    assert kept["full"] < kept["selective"] < kept["none"] - 0.3 * layers, kept


def test_recompute_mode_from_flags():
    def mode(**values):
        return recompute_mode(TrainConfig.for_script("pretrain", **values).model)

    assert mode() == "none"
    assert mode(grad_checkpoint=True) == "full"
    assert mode(recompute="selective") == "selective"
    assert mode(recompute_layers_per_stage=(1, 1)) == "full"


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointing_is_non_reentrant(mode):
    """transformers 4.51 defaults to reentrant checkpointing, which cannot take a selective policy."""
    model = llama(mode)
    assert model.model._gradient_checkpointing_func.keywords["use_reentrant"] is False
    assert ("context_fn" in model.model._gradient_checkpointing_func.keywords) == (mode == "selective")
