r"""Held-out evaluation.

During training (`Evaluator`): the mean loss over a fixed list of batches, weighted by the tokens
each batch's loss averages over, the same on every rank.

After it (eval.py, `evaluate_documents`): how well a model predicts raw text, per document, with
the conventions of lm-evaluation-harness so the numbers compare with its:
- Perplexity. Each document is [BOS] + its tokens (no EOS), and every token after the BOS is
  predicted exactly once, from a window of at most `max_length` positions (`rolling_windows`).
  The first window scores up to max_length tokens; each next one scores `stride` new tokens, the
  first of them seen after max_length - stride + 1 tokens of context. stride = max_length gives
  lm-eval's `loglikelihood_rolling` windows; a smaller stride gives each token more context (as the
  Hugging Face perplexity guide's stride of 512) at more compute. Only the document's first window
  starts with BOS. Reported: token perplexity exp(nll / tokens), bits per byte nll / ln 2 / UTF-8
  bytes and byte perplexity exp(nll / bytes) (both independent of the tokenizer), and word
  perplexity exp(nll / words), words counted as lm-eval does (`re.split(r"\s+", text)`).
- Cloze (LAMBADA's rule): the document's last word, after its last run of whitespace, must be
  predicted whole: every token of it the model's most likely next token (greedy), given the text
  before it. Reported: that accuracy, and the perplexity exp(mean negative log-likelihood of the
  word per document).

Documents are dealt to the processes in turn (document i to rank i % world); each document's
windows are batched only with each other, so its numbers do not depend on the process count, and
the sums are all-reduced in float64.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator

import torch
from tqdm import tqdm

from .config import DataConfig
from .distributed import device, is_main_process, rank, sum_across_ranks, world_size
from .loss import target_tokens
from .parallel import Parallelism
from .prepared import prepared_documents
from .sources import dataset_kind, load_text_stream, source_for

# Scored positions whose logits are computed at once: 1,024 x a 32,000-token vocabulary is 131 MB of
# fp32. A whole batch of windows at once (GBs) costs more in fresh pages than the arithmetic.
LOGITS_CHUNK = 1024


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
                n = target_tokens(batch["labels"])  # the tokens the loss averages over
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


def rolling_windows(num_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows that score a document of [BOS] + `num_tokens` tokens (stream positions 0..n).

    Each window is (input_start, input_end, first_target): the model reads stream[input_start:
    input_end] (at most max_length tokens), its position p predicting stream[p + 1], and the window
    scores the targets first_target .. input_end. Every target 1..n is scored exactly once."""
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must lie in 1..max_length, got {stride} (max_length {max_length})")
    windows, scored = [], 0  # targets 1..scored are done
    while scored < num_tokens:
        last = scored + min(stride if windows else max_length, num_tokens - scored)
        windows.append((max(0, last - max_length), last, scored + 1))
        scored = last
    return windows


def document_nll(model, stream: list[int], max_length: int, stride: int, batch_size: int) -> tuple[float, int]:
    """(summed negative log-likelihood in nats, tokens scored) of one document's stream ([BOS] +
    tokens). Windows are padded on the right to the batch's longest: a causal model's real
    positions never see the padding. Logits are computed only at the scored positions."""
    ids = torch.tensor(stream, device=device())
    windows = rolling_windows(len(stream) - 1, max_length, stride)
    nll = 0.0
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size]
        width = max(end - start for start, end, _ in batch)
        inputs = torch.zeros(len(batch), width, dtype=torch.long, device=ids.device)
        rows, positions, targets = [], [], []
        for row, (start, end, first) in enumerate(batch):
            inputs[row, : end - start] = ids[start:end]
            rows += [row] * (end - first + 1)
            positions += range(first - 1 - start, end - start)
            targets.append(ids[first : end + 1])
        hidden = model.model(input_ids=inputs, use_cache=False).last_hidden_state
        scored, targets = hidden[torch.tensor(rows), torch.tensor(positions)], torch.cat(targets)
        for chunk in range(0, len(targets), LOGITS_CHUNK):  # LOGITS_CHUNK positions' logits at a time, not GBs
            logits = model.lm_head(scored[chunk : chunk + LOGITS_CHUNK]).float()
            losses = torch.nn.functional.cross_entropy(logits, targets[chunk : chunk + LOGITS_CHUNK], reduction="none")
            nll += float(losses.double().sum())
    return nll, len(stream) - 1


def cloze_split(text: str) -> tuple[str, str] | None:
    """(context, its last word with the whitespace before it), or None for a text of one word."""
    match = re.fullmatch(r"(.*\S)(\s+\S+)\s*", text, re.S)
    return (match.group(1), match.group(2)) if match else None


def cloze_score(model, tokenizer, context: str, word: str, max_length: int) -> tuple[bool, float]:
    """(whether the model predicts every token of `word` greedily after `context`, the word's
    negative log-likelihood). The word's tokens are those the whole text adds after the
    context's, as lm-eval splits them."""
    context_ids = [_prefix_id(tokenizer), *_encode(tokenizer, context)]
    whole = [_prefix_id(tokenizer), *_encode(tokenizer, context + word)]
    target = whole[len(context_ids) :] or whole[-1:]
    inputs = whole[:-1][-max_length:]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([inputs], device=device()), logits_to_keep=len(target)).logits[0]
        logits = logits[-len(target) :].float()
    target_t = torch.tensor(target, device=logits.device)
    nll = float(torch.nn.functional.cross_entropy(logits, target_t, reduction="sum"))
    return bool((logits.argmax(-1) == target_t).all()), nll


def _prefix_id(tokenizer) -> int:
    """What each document starts with: BOS, or EOS for a tokenizer without one (as lm-eval does)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def _encode(tokenizer, text: str) -> list[int]:
    # split_special_tokens: a literal "</s>" in the text is text, as in training
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def eval_documents(data: DataConfig, tokenizer, limit: int | None = None) -> Iterator[tuple[str, list[int] | None]]:
    """(text, stream) of each document of `-d` in order: a text source gives its text (tokenized
    later), a prepared dataset its stream ([BOS] + tokens; decoded later, by the rank that scores it)."""
    count = 0
    if dataset_kind(data.dataset) == "prepared":
        documents = ((None, doc) for doc in prepared_documents(data.dataset))
    else:
        documents = ((row["text"], None) for row in load_text_stream(source_for(data)))
    for text, tokens in documents:
        if limit is not None and count >= limit:
            return
        count += 1
        if tokens is not None:  # BOS, tokens, EOS as prepared: drop the EOS, as a text source has none
            yield None, [int(t) for t in (tokens[:-1] if tokens[-1] == tokenizer.eos_token_id else tokens)]
        else:
            yield text, None


SUMS = ("documents", "nats", "tokens", "bytes", "words", "cloze_documents", "cloze_correct", "cloze_nats")


def evaluate_documents(model, tokenizer, documents, task: str, max_length: int, stride: int, batch_size: int) -> dict:
    """This rank's share of `documents` scored, summed over every rank: the SUMS (float64)."""
    sums = dict.fromkeys(SUMS, 0.0)
    mine = (doc for i, doc in enumerate(documents) if i % world_size() == rank())
    with torch.no_grad():
        for text, stream in tqdm(
            mine, desc=f"{task} (rank 0's documents)", unit=" docs", disable=not is_main_process()
        ):
            sums["documents"] += 1
            if text is None:  # a prepared document: its text, for bytes, words and cloze's last word
                text = tokenizer.decode(stream, skip_special_tokens=True)
            if task == "cloze":
                split = cloze_split(text)
                if split is None:
                    continue
                correct, nll = cloze_score(model, tokenizer, *split, max_length)
                sums["cloze_documents"] += 1
                sums["cloze_correct"] += correct
                sums["cloze_nats"] += nll
                continue
            stream = stream or [_prefix_id(tokenizer), *_encode(tokenizer, text)]
            if len(stream) < 2:
                continue  # an empty document predicts nothing
            nats, tokens = document_nll(model, stream, max_length, stride, batch_size)
            sums["nats"] += nats
            sums["tokens"] += tokens
            sums["bytes"] += len(text.encode("utf-8"))
            sums["words"] += len(re.split(r"\s+", text))
    total = sum_across_ranks(torch.tensor([sums[k] for k in SUMS], dtype=torch.float64))
    return dict(zip(SUMS, total.tolist(), strict=True))


def eval_scores(sums: dict) -> dict:
    """The reported numbers from the sums (see the module's docstring)."""
    out = {}
    if sums["tokens"]:
        nats = sums["nats"]
        out.update(
            token_perplexity=math.exp(nats / sums["tokens"]),
            bits_per_byte=nats / math.log(2) / sums["bytes"],
            byte_perplexity=math.exp(nats / sums["bytes"]),
            word_perplexity=math.exp(nats / sums["words"]),
            nll_per_token=nats / sums["tokens"],
        )
    if sums["cloze_documents"]:
        out.update(
            cloze_accuracy=sums["cloze_correct"] / sums["cloze_documents"],
            cloze_perplexity=math.exp(sums["cloze_nats"] / sums["cloze_documents"]),
        )
    return out
