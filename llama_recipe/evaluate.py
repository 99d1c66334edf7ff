"""Held-out evaluation: during training, the mean loss over a fixed list of batches, weighted by the
tokens each batch's loss averages over, the same on every rank (`Evaluator`); after it, how well a
model predicts raw text, in bits per byte (`held_out_text_scores`)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .distributed import device
from .loss import IGNORE_INDEX
from .parallel import Parallelism


class Evaluator:
    """`evaluator(model)` -> the held-out loss. `batches` is this replica's share (every replica
    has as many batches, so forward passes with collectives stay in step); `inputs` turns a batch
    into the model's arguments, as in training."""

    def __init__(self, par: Parallelism, batches: list[dict], inputs: Callable[[dict], dict]):
        self.par, self.batches, self.inputs = par, batches, inputs

    def __call__(self, model) -> float:
        model.eval()
        loss_sum = torch.zeros((), device=device())
        tokens = 0
        with torch.no_grad():
            for batch in self.batches:
                n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # the tokens the loss averages over
                if self.par.pipeline:
                    loss = self.par.run_pipeline(model, None, self.inputs(batch))
                else:
                    with self.par.forward_context():
                        loss = model(**self.inputs(batch)).loss
                if loss is not None:  # None on pipeline stages other than the last
                    loss_sum += loss.float() * n
                tokens += n
        model.train()
        loss_mean, tokens_mean = self.par.mean_across_replicas(loss_sum, tokens)
        return loss_mean / max(tokens_mean, 1e-9)


def held_out_text_scores(model, tokenizer, texts: list[str], window: int, device: torch.device) -> dict:
    """How well a model predicts raw text (one process): the summed negative log-likelihood of
    every token of every text but its BOS, each predicted once, in windows of `window` tokens that
    overlap by one (each window's first token is the previous one's last, so it is context, not
    scored again). Returns nats, tokens, UTF-8 bytes, bits per byte and token perplexity."""
    nll, tokens, nbytes = 0.0, 0, 0
    model.eval()
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor(tokenizer(text, add_special_tokens=True, split_special_tokens=True)["input_ids"])
            nbytes += len(text.encode("utf-8"))
            for start in range(0, len(ids) - 1, window - 1):
                chunk = ids[start : start + window].to(device)[None]
                logits = model(input_ids=chunk).logits.float()
                nll += torch.nn.functional.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum").item()
                tokens += chunk.shape[1] - 1
    return dict(nats=nll, tokens=tokens, bytes=nbytes, bits_per_byte=nll / math.log(2) / nbytes,
                perplexity=math.exp(nll / tokens))  # fmt: skip
