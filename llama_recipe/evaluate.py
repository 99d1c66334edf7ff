"""Held-out loss during training: the mean loss over a fixed list of batches, weighted by the
tokens each batch's loss averages over, and the same on every rank."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .distributed import device
from .instruct import IGNORE_INDEX
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
