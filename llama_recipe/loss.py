"""The causal language-model loss without the full logits: the output projection and the
cross-entropy computed over chunks of the tokens, so that only one chunk's logits ever exist.

The plain path (transformers' `LlamaForCausalLM.forward`) materialises fp32 logits of
tokens x vocabulary (1 GB for 4 x 2048 tokens of a 32,000-word vocabulary), keeps the log-softmax
for backward, and creates a gradient of the same size. Here each chunk's logits give that chunk's
loss and, at once, its share of the gradients of the hidden states and of the output weight (the
approach of Liger's fused linear cross-entropy): forward does the same three matrix products the
plain path spreads over forward and backward, and backward only scales the stored gradients.

The loss means the same as transformers': labels shifted by one (position t predicts label t+1),
`-100` labels ignored, the mean over the remaining tokens. In fp32 it equals the plain loss and its
gradients to rounding (tests/test_loss.py).

`use_chunked_loss(model)` swaps it into one model's forward when it is given labels; without labels
(generation, tests reading logits) the model's own forward runs. Which plugins allow it is data in
plugins.py (`PluginSpec.chunked_loss`): shardformer (hybrid_parallel) replaces the forward with its
own, which has its own vocabulary-parallel cross-entropy.

Every one of those losses is the mean over its own batch's target tokens. A training step may run
several of them (accumulation micro-steps, pipeline micro-batches, data-parallel replicas), and
averaging their means would weigh a token of a short finetuning completion more than one of a long
completion, by an amount that depends on -b, --accumulation_steps and the replica count.
`token_weighted` turns each micro-batch's mean into its share of the mean over every target token
of the step, as the held-out evaluation (evaluate.py) already counts them.
"""

from __future__ import annotations

import types

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

IGNORE_INDEX = -100  # the label transformers' loss skips (finetuning masks the prompt with it)
CHUNK_TOKENS = 1024  # tokens per chunk: 1024 x 32,000 fp32 logits = 131 MB, large enough for efficient GEMMs


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over valid tokens of cross_entropy(hidden @ weight.T, targets), divided by their number.

    hidden (N, H), weight (V, H), targets (N,) with IGNORE_INDEX where no loss is taken. When a
    gradient is wanted, forward computes both gradients chunk by chunk (d loss / d logits is
    softmax - one_hot), so backward has nothing to recompute.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int):
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            h, t = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
            logits = (h @ weight.T).float()  # as the plain path: logits in the compute dtype, the loss in fp32
            valid = t != IGNORE_INDEX
            safe_targets = torch.where(valid, t, 0)[:, None]
            log_normaliser = torch.logsumexp(logits, dim=-1)
            total += ((log_normaliser - logits.gather(1, safe_targets).squeeze(1)) * valid).sum()
            if want_hidden or want_weight:
                grad_logits = logits.sub_(log_normaliser[:, None]).exp_()  # softmax, in place of the logits
                grad_logits.scatter_add_(1, safe_targets, -torch.ones_like(safe_targets, dtype=grad_logits.dtype))
                grad_logits = grad_logits.mul_(valid[:, None]).to(h.dtype)
                if want_hidden:
                    grad_hidden[start : start + chunk_tokens] = grad_logits @ weight
                if want_weight:
                    grad_weight += (grad_logits.T @ h).float()
        count = (targets != IGNORE_INDEX).sum()
        ctx.save_for_backward(grad_hidden, grad_weight, count)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_loss / count
        if grad_hidden is not None:
            grad_hidden = grad_hidden * scale.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * scale).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None


def chunked_causal_lm_loss(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = CHUNK_TOKENS
) -> torch.Tensor:
    """transformers' causal LM loss of `hidden @ weight.T` against `labels` (batch, seq), without the logits.

    Under autocast the inputs are cast here, as autocast would cast them for the output layer, and
    the chunks run outside it (autocast would not reach the products inside an autograd function's backward)."""
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    targets = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # position t predicts t+1
    with torch.autocast(hidden.device.type, enabled=False):
        return ChunkedLinearCrossEntropy.apply(
            hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1).to(hidden.device), chunk_tokens
        )


def target_tokens(labels: torch.Tensor) -> int:
    """The tokens a causal LM loss over `labels` (batch, seq) averages over: position t predicts label
    t + 1, so the first label is never a target; `-100` labels are none."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def token_weighted(mean_loss: torch.Tensor, tokens: int, tokens_per_replica: float) -> torch.Tensor:
    """A micro-batch's mean loss over its `tokens` target tokens, as its share of the step's loss:
    the sum of its token losses over `tokens_per_replica`, the step's target tokens over all its
    micro-batches and replicas divided by the replica count (the plugins average gradients over
    replicas, so each replica's gradient must be dp_size times its share of the global mean).

    Written as a division by `tokens_per_replica / tokens`, which is exactly the number of
    micro-batches when they all hold as many target tokens (packed pretraining rows): the loss is
    then bit for bit the old `loss / accumulation_steps`. A micro-batch with nothing to predict (no
    finetuning or pretraining data makes one; a damaged batch can) keeps its NaN mean (0/0), so the
    step's loss is not finite and the non-finite guard skips the update."""
    if tokens == 0:
        return mean_loss
    return mean_loss / (tokens_per_replica / tokens)


def _forward_with_chunked_loss(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, **kwargs):
    """LlamaForCausalLM.forward, with the chunked loss when given labels (then no logits are returned)."""
    if labels is None or kwargs.get("past_key_values") is not None or kwargs.get("inputs_embeds") is not None:
        return type(self).forward(self, input_ids, attention_mask, position_ids, labels=labels, **kwargs)
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    loss = chunked_causal_lm_loss(outputs.last_hidden_state, self.lm_head.weight, labels)
    return CausalLMOutputWithPast(loss=loss)


def use_chunked_loss(model: torch.nn.Module) -> torch.nn.Module:
    """Make this model (a transformers LlamaForCausalLM) compute its loss chunk by chunk. Only this
    instance changes: its class, weights and saved config stay transformers' own."""
    model.forward = types.MethodType(_forward_with_chunked_loss, model)
    return model
