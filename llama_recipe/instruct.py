"""Instruction-tuning data: `{"prompt", "completion"}` rows, loss on the completion only.

Each example is `prompt + completion + EOS`. Prompt tokens and padding get label -100, so the
model is trained only to produce the answer (the ColossalAI example trained on the prompt and the
padding, with no EOS). An example longer than the row is cut from the prompt's start, keeping the
answer. The data is small and map-style: it is shuffled per epoch from the seed, dealt evenly
to the data-parallel replicas in turn, and its position is (epoch, index) — exactly resumable.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from .errors import UsageError
from .generation import Completion, Generator, Sampling
from .loss import IGNORE_INDEX
from .model import load_pretrained_model
from .sources import resolve_local_files


def load_instruction_rows(dataset: str, task_name: str) -> list[dict]:
    """Rows from a local JSONL file, a directory laid out like the hub dataset (one sub-directory
    per task), or a Hugging Face dataset name with `task_name` as its configuration."""
    from datasets import disable_progress_bars, load_dataset
    from datasets.exceptions import DatasetsError

    disable_progress_bars()  # "Generating train split" bars on stderr say nothing about the run
    path = Path(dataset).expanduser()
    if path.is_dir() and not any(path.glob("*.json*")):
        tasks = sorted(p.name for p in path.iterdir() if p.is_dir() and any(p.glob("*.json*")))
        if task_name not in tasks:
            raise UsageError(
                f"{dataset} has no task {task_name!r} (it has: {', '.join(tasks)}); pass --task_name with one of them"
            )
        path = path / task_name
    if path.exists() or dataset.endswith((".jsonl", ".json")):
        files = resolve_local_files(str(path))
        try:
            rows = load_dataset("json", data_files=files, split="train")
        # Lines that are not JSON objects (datasets wraps pyarrow's ArrowInvalid in DatasetGenerationError),
        # an unreadable file; datasets 5.0 raises StopIteration on an empty file.
        except (DatasetsError, OSError, ValueError, StopIteration) as e:
            raise UsageError(
                f"could not read {dataset} as JSON lines of prompt/completion ({type(e).__name__}); fix the file"
            ) from None
    else:
        try:
            rows = load_dataset(dataset, task_name, split="train")
        # Not found, gated or unreachable (OSErrors: ConnectionError, DatasetNotFoundError, the hub's
        # HTTP errors), a name or configuration it refuses (ValueError), a dataset that fails to build.
        except (OSError, ValueError, DatasetsError) as e:
            raise UsageError(
                f"could not open Hugging Face dataset {dataset!r}/{task_name} ({type(e).__name__}); if this machine is "
                "offline, pass -d data/self_instruct with --task_name self_instruct, human_eval or prompt_source "
                "(the shipped sample has no super_natural_instructions)"
            ) from None
    missing = {"prompt", "completion"} - set(rows.column_names)
    if missing:
        raise UsageError(
            f"dataset {dataset!r} lacks the field(s) {', '.join(sorted(missing))}; rows need prompt and completion"
        )
    usable = [
        {"prompt": r["prompt"], "completion": r["completion"]}
        for r in rows
        if isinstance(r["prompt"], str) and isinstance(r["completion"], str) and r["completion"].strip()
    ]
    if not usable:
        raise UsageError(f"dataset {dataset!r} has no row with a string prompt and a non-empty string completion")
    if len(usable) < len(rows):
        sys.stderr.write(
            f"warning: skipped {len(rows) - len(usable)} rows of {dataset} without a string prompt and completion\n"
        )
    return usable


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """A prompt as an example starts: BOS + the prompt's tokens."""
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def encode_example(tokenizer, prompt: str, completion: str, max_length: int) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated). BOS + prompt + completion + EOS; labels mask the prompt."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    answer_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    truncated = len(prompt_ids) + len(answer_ids) > max_length
    if truncated:
        keep = max(0, max_length - len(answer_ids))
        prompt_ids = prompt_ids[len(prompt_ids) - keep :] if keep else []
        answer_ids = answer_ids[:max_length]
    return prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids, truncated


def encode_chat(tokenizer, messages: list[tuple[str, str]]) -> list[int]:
    """A conversation, (role, text) pairs ending with the user's, as the tokens finetune.py trains
    on: each earlier exchange a finished example (`encode_example`: BOS + prompt + answer + EOS),
    then BOS + the last prompt for the model to answer. The training rows have no roles: a system
    message and the user's messages up to the next answer are one prompt, joined by a blank line
    (as the shipped data puts an instruction before its input)."""
    ids, prompt = [], []
    for role, text in messages:
        if role != "assistant":
            prompt.append(text)
            continue
        ids += encode_example(tokenizer, "\n\n".join(prompt), text, max_length=sys.maxsize)[0]
        prompt = []
    return ids + encode_prompt(tokenizer, "\n\n".join(prompt))


def padding_id(tokenizer) -> int:
    """LLaMA's tokenizer has no pad token; padding is masked out of attention and loss, so EOS serves."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collate(encoded: list[tuple[list[int], list[int]]], pad_id: int, width: int | None = None) -> dict:
    """Right-pad (input_ids, labels) pairs into a batch; padding is masked out of attention and loss."""
    width = width or max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_packed(rows: list[list[tuple[list[int], list[int]]]], pad_id: int, width: int) -> dict:
    """Rows of several examples each, padded to `width`. Position ids restart at 0 for every
    example (and for the padding), which is how document attention finds the examples: each one
    attends only to itself. Labels need no seam handling: an example's first label is its BOS,
    a prompt token, so -100, and the previous example's last token never learns to predict it."""
    packed = []
    for examples in rows:
        ids = [t for example_ids, _ in examples for t in example_ids]
        packed.append((ids, [label for _, example_labels in examples for label in example_labels]))
    batch = collate(packed, pad_id, width)
    position_ids = torch.zeros_like(batch["input_ids"])
    for row, examples in enumerate(rows):
        start = 0
        for example_ids, _ in examples:
            position_ids[row, start : start + len(example_ids)] = torch.arange(len(example_ids))
            start += len(example_ids)
        position_ids[row, start:] = torch.arange(width - start)
    batch["position_ids"] = position_ids
    return batch


def split_held_out(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows): a fixed random `fraction` of the examples is never trained on."""
    if fraction <= 0:
        return rows, []
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = max(1, round(len(rows) * fraction))
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]


def held_out_batches(
    rows: list[dict], tokenizer, max_length: int, batch_size: int, dp_rank: int, dp_size: int, pad_to_max_length: bool
) -> list[dict]:
    """This replica's share of the held-out examples, in order. Every replica gets the same number of
    batches, so forward passes with collectives (DDP buffers, tensor parallel) stay in step."""
    share = len(rows) // dp_size
    mine = rows[dp_rank * share : (dp_rank + 1) * share]
    pad_id = padding_id(tokenizer)
    batches = []
    for start in range(0, len(mine), batch_size):
        encoded = [
            encode_example(tokenizer, r["prompt"], r["completion"], max_length)[:2]
            for r in mine[start : start + batch_size]
        ]
        batches.append(collate(encoded, pad_id, max_length if pad_to_max_length else None))
    return batches


def generate_answers(
    model: str | torch.nn.Module, tokenizer, prompts: list[str], sampling: Sampling | None = None
) -> list[str]:
    """Answers of a saved model (its directory, or the model loaded) to some prompts (greedy unless
    `sampling` says otherwise), on one process, from the checkpoint, so it works whatever the
    training layout was; an empty answer is a note saying why (`shown_answer`)."""
    model = load_pretrained_model(model) if isinstance(model, str) else model.eval()
    generator = Generator(model, tokenizer)
    sampling = sampling or Sampling()
    return [shown_answer(generator.complete(prompt, sampling), tokenizer.eos_token_id) for prompt in prompts]


def shown_answer(completion: Completion, eos_token_id: int) -> str:
    """The answer's text, stripped; if nothing is left, a note on why, so that a blank answer is not
    taken for a broken script."""
    text = completion.text.strip()
    if text:
        return text
    if completion.steps and completion.steps[0].token_id == eos_token_id:
        return (
            "(the model ended its answer at once: it generated the end-of-sequence token first; "
            "a model this small or finetuned this briefly often does)"
        )
    blank = sum(step.token_id != eos_token_id for step in completion.steps)
    return (
        f"(the model's answer is blank: {blank} token{'s' * (blank != 1)} of spaces and line breaks only; "
        "a model this small or finetuned this briefly often does this)"
    )


class InstructionBatches:
    """Padded batches of encoded examples for one data-parallel replica, epoch after epoch.

    With `pack`, each row holds as many whole examples as fit in `max_length` (in shuffled order),
    with position ids restarting per example for document attention (see `collate_packed`)."""

    def __init__(
        self, rows, tokenizer, max_length, batch_size, dp_rank, dp_size, seed, pad_to_max_length=False, pack=False
    ):
        self.rows, self.tokenizer, self.max_length = rows, tokenizer, max_length
        self.batch_size, self.dp_rank, self.dp_size, self.seed = batch_size, dp_rank, dp_size, seed
        self.pad_to_max_length = pad_to_max_length  # pipelines need one shape for every step
        self.pack = pack
        self._encoded: dict[int, tuple[list[int], list[int]]] = {}  # packing looks ahead: encode each row once
        self.pad_id = padding_id(tokenizer)
        self.per_replica = len(rows) // dp_size  # equal shares: every replica runs the same number of steps
        if self.per_replica < batch_size:
            raise UsageError(f"{len(rows)} examples are too few for -b {batch_size} on {dp_size} replicas; lower -b")
        self.epoch, self.position, self.truncated = 0, 0, 0
        self._order = self._epoch_order()

    @property
    def steps_per_epoch(self) -> int:
        if not self.pack:
            return self.per_replica // self.batch_size
        rows, length = 0, 0  # replay the packing of this epoch's order
        for i in self._order:
            n = len(self._encode(i)[0])
            if length and length + n > self.max_length:
                rows, length = rows + 1, 0
            length += n
        return (rows + (length > 0)) // self.batch_size

    def _encode(self, index: int) -> tuple[list[int], list[int]]:
        if index not in self._encoded:
            row = self.rows[index]
            ids, labels, truncated = encode_example(self.tokenizer, row["prompt"], row["completion"], self.max_length)
            self.truncated += truncated
            self._encoded[index] = (ids, labels)
        return self._encoded[index]

    def _next_index(self) -> int:
        if self.position >= self.per_replica:
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._epoch_order()
        return self._order[self.position]

    def _next_packed_batch(self) -> dict[str, torch.Tensor]:
        rows = []
        for _ in range(self.batch_size):
            examples, length = [], 0
            while True:
                example = self._encode(self._next_index())
                if examples and length + len(example[0]) > self.max_length:
                    break  # it starts the next row
                examples.append(example)
                length += len(example[0])
                self.position += 1
            rows.append(examples)
        return collate_packed(rows, self.pad_id, self.max_length)

    def _epoch_order(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.rows), generator=generator).tolist()
        # dealt in turn (replica r takes positions r, r + dp_size, ...), as prepared data is: without packing,
        # a step's global batch is then the same examples whatever -b x --accumulation_steps x replicas make it
        return order[self.dp_rank :: self.dp_size][: self.per_replica]

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.pack:
            return self._next_packed_batch()
        if self.position + self.batch_size > self.per_replica:
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._epoch_order()
        indices = self._order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        encoded = [self._encode(i) for i in indices]
        return collate(encoded, self.pad_id, self.max_length if self.pad_to_max_length else None)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._epoch_order()
