"""Attention that respects document boundaries in packed rows, and the flash-attn fallback."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_RUN, check_ok, read_scalars, run_in_process

from llama_recipe.attention import (
    document_causal_mask,
    flash_attn_available,
    model_inputs,
    segment_positions,
    select_attention,
)
from llama_recipe.model import build_model, get_model_config

EOS = 2


def packed_row() -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """One row: the tail of a document begun in an earlier row, then two whole documents, then the
    head of the next. Returns ids, document positions (as the data pipeline makes them) and spans."""
    torch.manual_seed(0)
    lengths, first = [5, 9, 7, 11], 13  # the first segment continues a document at position 13
    ids, positions, spans, start = [], [], [], 0
    for i, n in enumerate(lengths):
        body = torch.randint(3, 32000, (n,)).tolist()
        ids += body[:-1] + [EOS if i < len(lengths) - 1 else body[-1]]
        positions += list(range(first if i == 0 else 0, (first if i == 0 else 0) + n))
        spans.append((start, start + n))
        start += n
    return torch.tensor([ids]), torch.tensor([positions]), spans


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    eager = build_model(get_model_config("tiny"), "eager").eval()
    sdpa = build_model(get_model_config("tiny"), "sdpa").eval()
    sdpa.load_state_dict(eager.state_dict())
    return eager, sdpa


def test_segments_restart_at_row_starts():
    positions = torch.tensor([[13, 14, 15, 0, 1, 2, 0, 1], [0, 1, 2, 3, 0, 1, 2, 3]])
    assert segment_positions(positions).tolist() == [[0, 1, 2, 0, 1, 2, 0, 1], [0, 1, 2, 3, 0, 1, 2, 3]]
    mask = document_causal_mask(segment_positions(positions[:1]), torch.float32)[0, 0]
    allowed = mask == 0
    assert allowed[4].tolist() == [False, False, False, True, True, False, False, False]  # doc 2 sees only itself
    assert allowed.tril().equal(allowed) and allowed.diagonal().all()  # causal, and each token sees itself


def test_sdpa_with_document_mask_equals_each_document_alone(models):
    eager, sdpa = models
    ids, positions, spans = packed_row()
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": positions}
    with torch.no_grad():
        packed = sdpa(**model_inputs(batch, "sdpa", True, torch.float32)).logits[0]
        for start, end in spans:  # each document on its own, positions from 0, plain eager attention
            alone = eager(ids[:, start:end], position_ids=torch.arange(end - start)[None]).logits[0]
            torch.testing.assert_close(packed[start:end], alone, rtol=1e-5, atol=1e-5)


def test_no_token_attends_across_a_document_boundary(models):
    """Gradient check: document B's loss does not depend on document A's tokens at all."""
    _, sdpa = models
    ids, positions, spans = packed_row()
    inputs = model_inputs({"input_ids": ids, "labels": ids, "position_ids": positions}, "sdpa", True, torch.float32)
    embeddings = sdpa.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = sdpa(
        inputs_embeds=embeddings, position_ids=inputs["position_ids"], attention_mask=inputs["attention_mask"]
    ).logits
    (b_start, b_end) = spans[2]
    logits[0, b_start:b_end].logsumexp(-1).sum().backward()
    grad_per_token = embeddings.grad[0].abs().sum(-1)
    assert grad_per_token[:b_start].eq(0).all() and grad_per_token[b_end:].eq(0).all()
    assert grad_per_token[b_start:b_end].gt(0).all()
    # Without the document mask, the same loss does depend on earlier documents: the check can fail.
    embeddings.grad = None
    sdpa(inputs_embeds=embeddings).logits[0, b_start:b_end].logsumexp(-1).sum().backward()
    assert embeddings.grad[0, :b_start].abs().sum() > 0


def test_flash_request_falls_back_with_a_message_without_flash_attn():
    if flash_attn_available():
        pytest.skip("flash-attn is installed on a CUDA device here")
    implementation, message = select_attention(True)
    assert implementation == "sdpa" and "SDPA" in message
    assert select_attention(False) == ("sdpa", None)


def test_pretrain_with_document_attention_trains_and_says_which_kernel(tmp_path):
    """(With hybrid_parallel it is refused in one line: test_bad_input.py.) With --device_memory below the
    planner's predicted peak it also warns, once, naming a layout that fits (test_memory.py checks that one)."""
    args = [*TINY_RUN, "-p", "zero2", "-a", "--document_attention", "--max_steps", "4", "-o", str(tmp_path / "c")]
    proc = run_in_process("pretrain.py", [*args, "-t", str(tmp_path / "tb"), "--device_memory", "0.12"])
    check_ok(proc)
    warnings = [line for line in proc.stdout.splitlines() if line.startswith("warning: predicted peak")]
    assert len(warnings) == 1 and "exceeds this device's 0.12 GB" in warnings[0] and ": try -p " in warnings[0]
    if not flash_attn_available():
        assert "uses PyTorch SDPA attention instead" in proc.stdout
    assert "attention confined to documents" in proc.stdout
    losses = read_scalars(tmp_path / "tb")
    assert losses[4] < losses[1]


@pytest.mark.gpu
@pytest.mark.skipif(not flash_attn_available(), reason="needs flash-attn on a CUDA device")
def test_flash_varlen_matches_sdpa_document_mask():
    torch.manual_seed(0)
    config = get_model_config("tiny")
    flash = build_model(config, "flash_attention_2").to("cuda", torch.bfloat16).eval()
    sdpa = build_model(config, "sdpa").to("cuda", torch.bfloat16).eval()
    sdpa.load_state_dict(flash.state_dict())
    ids, positions, _ = packed_row()
    batch = {"input_ids": ids.cuda(), "labels": ids.cuda(), "position_ids": positions.cuda()}
    with torch.no_grad():
        a = flash(**model_inputs(batch, "flash_attention_2", True, torch.bfloat16)).logits.float()
        b = sdpa(**model_inputs(batch, "sdpa", True, torch.bfloat16)).logits.float()
    torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)  # bf16 kernels differ in rounding only
