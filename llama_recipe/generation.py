"""Text generation from a trained model, one token at a time with a key/value cache: greedy or
sampled (temperature, top-k, top-p, a seed), stop strings, per-token log-probabilities, streamed.
`scripts/generate.py`, finetuning's example answers and `serve.py` all generate through here, so
they give the same text for the same request.

Log-probabilities are the model's own (a log-softmax of its logits, before temperature or top-k/p
reshape the distribution), as OpenAI's and Megatron's servers report them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .errors import UsageError


@dataclass(frozen=True)
class Sampling:
    """How to choose each next token. temperature 0: greedy (the most likely token)."""

    max_new_tokens: int = 48
    temperature: float = 0.0
    top_k: int = 0  # keep the k most likely tokens (0: all)
    top_p: float = 1.0  # keep the most likely tokens whose probabilities add up to p
    seed: int | None = None  # the same seed and request give the same text
    stop: tuple[str, ...] = ()  # end the text before the first of these strings
    top_logprobs: int = 0  # also report the n most likely tokens at each position

    def problem(self) -> str | None:
        """What is wrong with these settings, or None."""
        if self.max_new_tokens < 0:
            return f"max_new_tokens must be at least 0, got {self.max_new_tokens}"
        if not self.temperature >= 0:
            return f"temperature must be at least 0 (0: greedy), got {self.temperature}"
        if self.top_k < 0:
            return f"top_k must be at least 0 (0: no limit), got {self.top_k}"
        if not 0 < self.top_p <= 1:
            return f"top_p must be above 0 and at most 1, got {self.top_p}"
        return None


@dataclass
class Step:
    """One generated token."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)  # token id -> logprob, when asked


@dataclass
class Completion:
    """A prompt's generated text and its tokens. finish_reason: "stop" (EOS or a stop string) or
    "length" (max_new_tokens reached)."""

    text: str
    steps: list[Step]
    finish_reason: str
    prompt_ids: list[int]


def sample_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """The next token from one position's logits (fp32)."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    scores = logits / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(scores, min(sampling.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1:
        ordered, order = torch.sort(scores, descending=True)
        probs = ordered.softmax(-1)
        outside = probs.cumsum(-1) - probs > sampling.top_p  # tokens after the nucleus is full
        scores = scores.index_fill(0, order[outside], float("-inf"))
    return int(torch.multinomial(scores.softmax(-1), 1, generator=generator))


class Generator:
    """Generates with one model on one device. Not thread-safe: callers serialise (serve.py holds
    a lock)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self.max_positions = model.config.max_position_embeddings

    def encode(self, prompt: str) -> list[int]:
        """The prompt's tokens, after BOS (as the model saw every document in training)."""
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def steps(self, prompt_ids: list[int], sampling: Sampling) -> Iterator[Step]:
        """Tokens one by one, until EOS, max_new_tokens or the model's positions run out."""
        if not prompt_ids:
            raise UsageError("the prompt has no tokens (the tokenizer adds no BOS); pass a non-empty prompt")
        from transformers import DynamicCache

        generator = None
        if sampling.temperature > 0:
            generator = torch.Generator(device=self.device)
            if sampling.seed is not None:
                generator.manual_seed(sampling.seed)
            else:
                generator.seed()  # a fresh seed for this request (torch's global generator untouched)
        cache, ids = DynamicCache(), torch.tensor([prompt_ids], device=self.device)
        budget = min(sampling.max_new_tokens, self.max_positions - len(prompt_ids))
        with torch.no_grad():
            for _ in range(budget):
                # logits of the last position only: a long prompt's prefill needs no others
                out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                logits = out.logits[0, -1].float()
                logprobs = logits.log_softmax(-1)
                token = sample_next(logits, sampling, generator)
                top = {}
                if sampling.top_logprobs:
                    values, indices = logprobs.topk(sampling.top_logprobs)
                    top = dict(zip(indices.tolist(), values.tolist(), strict=True))
                yield Step(token, float(logprobs[token]), top)
                if token == self.tokenizer.eos_token_id:
                    return
                ids = torch.tensor([[token]], device=self.device)

    def prompt_logprobs(self, prompt_ids: list[int]) -> list[float]:
        """The log-probability of each prompt token after the first, given the ones before it."""
        with torch.no_grad():
            logits = self.model(input_ids=torch.tensor([prompt_ids], device=self.device)).logits[0, :-1].float()
        targets = torch.tensor(prompt_ids[1:], device=self.device)
        return logits.log_softmax(-1).gather(1, targets[:, None])[:, 0].tolist()

    def stream(self, prompt_ids: list[int], sampling: Sampling) -> Iterator[tuple[str, Step | None, str | None]]:
        """(new text, its step, finish_reason) as tokens arrive; the text is held back while it could
        still turn into a stop string or ends inside a multi-byte character. The last item has the
        finish reason (and no step when a stop string ended the text)."""
        steps: list[Step] = []
        emitted = 0
        hold = max((len(s) for s in sampling.stop), default=1) - 1
        for step in self.steps(prompt_ids, sampling):
            steps.append(step)
            text = self.decode(steps, prompt_ids)
            cut = _first_stop(text, sampling.stop)
            if cut is not None:
                yield text[emitted:cut], None, "stop"
                return
            safe = len(text) - hold
            while safe > emitted and text[safe - 1] == "\ufffd":  # half of a character's bytes
                safe -= 1
            if safe > emitted:
                yield text[emitted:safe], step, None
                emitted = safe
            else:
                yield "", step, None
        ended = "stop" if steps and steps[-1].token_id == self.tokenizer.eos_token_id else "length"
        yield self.decode(steps, prompt_ids)[emitted:], None, ended

    def complete(self, prompt: str | list[int], sampling: Sampling) -> Completion:
        """The whole completion of one prompt (its text, or its tokens as `encode` gives them)."""
        prompt_ids = self.encode(prompt) if isinstance(prompt, str) else prompt
        parts, steps, finish = [], [], "length"
        for text, step, finish_reason in self.stream(prompt_ids, sampling):
            parts.append(text)
            if step is not None:
                steps.append(step)
            finish = finish_reason or finish
        return Completion("".join(parts), steps, finish, prompt_ids)

    def decode(self, steps: list[Step], prompt_ids: list[int]) -> str:
        """The generated text as it continues the prompt: decoded after the prompt's last tokens and
        cut after theirs, so a leading space survives (SentencePiece drops it at the start of a text)."""
        anchor = prompt_ids[-4:]
        base = self.tokenizer.decode(anchor, skip_special_tokens=True)
        full = self.tokenizer.decode(anchor + [s.token_id for s in steps], skip_special_tokens=True)
        return (
            full[len(base) :]
            if full.startswith(base)
            else self.tokenizer.decode([s.token_id for s in steps], skip_special_tokens=True)
        )


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the first stop string starts in `text`, or None."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None
