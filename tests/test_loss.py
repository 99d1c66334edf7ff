"""The chunked loss (llama_recipe/loss.py) equals transformers' plain loss and its gradients in fp32,
with ignored labels, chunks that do not divide the tokens, and through the model's forward.

The 2-process runs compare it too: ddp's layout run trains with --unfused_loss, zero2's with the
chunked loss, and tests/test_plugins_cpu.py requires their losses equal to 1e-5."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from llama_recipe.loss import IGNORE_INDEX, chunked_causal_lm_loss
from llama_recipe.model import build_model, get_model_config


def plain_loss(hidden, weight, labels):
    """transformers' own: the full logits, then its causal LM loss (shift by one, mean over valid labels)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    return ForCausalLMLoss(hidden @ weight.T, labels, vocab_size=weight.shape[0])


def labels_with_holes(batch: int, seq: int, vocab: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (batch, seq), generator=generator)
    labels[0, :37] = IGNORE_INDEX  # a masked prompt
    labels[1, seq - 50 :] = IGNORE_INDEX  # padding
    labels[1, 10:12] = IGNORE_INDEX
    return labels


@pytest.mark.parametrize("chunk_tokens", [64, 97, 10_000])  # several chunks, a ragged last one, a single chunk
def test_loss_and_gradients_equal_the_plain_ones(chunk_tokens):
    torch.manual_seed(0)
    batch, seq, hidden_size, vocab = 2, 150, 48, 1000
    labels = labels_with_holes(batch, seq, vocab)
    results = []
    for fn in (plain_loss, lambda h, w, y: chunked_causal_lm_loss(h, w, y, chunk_tokens)):
        torch.manual_seed(1)
        hidden = torch.randn(batch, seq, hidden_size, requires_grad=True)
        weight = (torch.randn(vocab, hidden_size) * 0.3).requires_grad_()
        loss = fn(hidden, weight, labels)
        (loss * 3.0).backward()  # a scaled loss, as accumulation divides it: backward must scale the gradients
        results.append((loss.detach(), hidden.grad, weight.grad))
    (plain, plain_dh, plain_dw), (chunked, chunked_dh, chunked_dw) = results
    assert plain.item() > 1.0  # a real loss over ~1000 classes, not zero
    torch.testing.assert_close(chunked, plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked_dh, plain_dh, rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked_dw, plain_dw, rtol=0, atol=1e-5)
    assert (plain_dh[0, :36] == 0).all() and (chunked_dh[0, :36] == 0).all()  # ignored labels teach nothing


def test_without_gradients_it_only_computes_the_loss():
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 150, 48), torch.randn(1000, 48)
    labels = labels_with_holes(2, 150, 1000)
    with torch.no_grad():
        loss = chunked_causal_lm_loss(hidden, weight, labels, 64)
    torch.testing.assert_close(loss, plain_loss(hidden, weight, labels), rtol=0, atol=1e-5)


def test_the_model_trains_with_it_as_with_the_plain_loss(tmp_path):
    """build_model(chunked_loss=True): the same loss and every parameter's gradient as transformers'
    LlamaForCausalLM on the same weights; no logits given labels, the usual logits without; and a
    Hugging Face directory that names transformers' class."""
    config = get_model_config("tiny")
    torch.manual_seed(0)
    chunked = build_model(config, chunked_loss=True)
    plain = build_model(config)
    plain.load_state_dict(chunked.state_dict())
    ids = torch.randint(0, config.vocab_size, (2, 600))  # 1200 tokens: a whole chunk of CHUNK_TOKENS and a part
    labels = ids.clone()
    labels[0, :300] = IGNORE_INDEX
    outputs = [model(input_ids=ids, labels=labels) for model in (plain, chunked)]
    for out in outputs:
        out.loss.backward()
    torch.testing.assert_close(outputs[1].loss, outputs[0].loss, rtol=0, atol=1e-5)
    assert outputs[1].logits is None
    for (name, p), q in zip(plain.named_parameters(), chunked.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-5, msg=name)
    with torch.no_grad():
        assert torch.equal(chunked(input_ids=ids[:, :20]).logits, plain(input_ids=ids[:, :20]).logits)
    chunked.save_pretrained(tmp_path)
    assert type(LlamaForCausalLM.from_pretrained(tmp_path)) is LlamaForCausalLM
    assert '"LlamaForCausalLM"' in (tmp_path / "config.json").read_text()


def test_token_weighted_micro_batches_give_the_token_mean_of_their_batch():
    """Micro-batches whose target tokens differ in number (masked prompts, padding): their token-weighted
    losses add up to the loss of the whole batch, and so do their gradients; the plain mean of their means
    (the old accumulation) does not. With as many target tokens in each, the weight is exactly 1 / count."""
    from llama_recipe.loss import target_tokens, token_weighted

    torch.manual_seed(0)
    hidden = torch.randn(4, 64, 16, requires_grad=True)
    weight = torch.randn(50, 16)
    labels = labels_with_holes(4, 64, 50)
    labels[2, :60] = IGNORE_INDEX  # a short completion
    whole = chunked_causal_lm_loss(hidden, weight, labels)
    (grad_whole,) = torch.autograd.grad(whole, hidden)

    parts = [(hidden[i : i + 1], labels[i : i + 1]) for i in range(4)]
    total = target_tokens(labels)
    assert total == sum(target_tokens(lab) for _, lab in parts) == int((labels[:, 1:] != IGNORE_INDEX).sum())
    weighted = sum(
        token_weighted(chunked_causal_lm_loss(h, weight, lab), target_tokens(lab), total) for h, lab in parts
    )
    (grad_weighted,) = torch.autograd.grad(weighted, hidden)
    torch.testing.assert_close(weighted, whole, rtol=1e-6, atol=0)  # fp32
    torch.testing.assert_close(grad_weighted, grad_whole, rtol=1e-5, atol=1e-8)
    mean_of_means = sum(chunked_causal_lm_loss(h, weight, lab) for h, lab in parts) / 4
    assert abs(mean_of_means.item() - whole.item()) > 1e-3

    loss = torch.tensor(10.391477584838867)
    assert token_weighted(loss, 254, 3 * 254).item() == (loss / 3).item()  # packed rows: the old loss / 3
