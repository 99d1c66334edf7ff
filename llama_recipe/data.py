"""Pretraining data: stream RedPajama-style text, tokenize, append EOS, pack into full rows.

The stream comes from `datasets.load_dataset(..., streaming=True)`: a Hugging Face dataset name
or local JSONL/Parquet files with a `text` field. Each data-parallel replica reads its own part of
the stream (tensor- and pipeline-parallel ranks of one replica read the same part). Documents are
concatenated, each followed by EOS, and cut into rows of exactly `seq_len` tokens, so no compute is
spent on padding; the leftover tokens wait in a buffer for the next row, so no token is dropped.

The position in the stream (the `datasets` iterator state, the leftover buffer and the epoch) is
saved with every checkpoint, so a resumed run sees exactly the rows it would have seen.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from .config import UsageError

LOCAL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet")


def _looks_local(dataset: str) -> bool:
    return (
        os.path.exists(dataset)
        or any(ch in dataset for ch in "*?[")
        or dataset.startswith((".", "/", "~"))
        or dataset.endswith(LOCAL_SUFFIXES)
    )


def resolve_local_files(dataset: str) -> list[str]:
    """The data files a local `-d` names: a file, a directory (searched recursively) or a glob."""
    path = Path(dataset).expanduser()
    if path.is_file():
        files = [str(path)]
    elif path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.name.endswith(LOCAL_SUFFIXES))
    else:
        files = sorted(f for f in glob.glob(str(path), recursive=True) if f.endswith(LOCAL_SUFFIXES))
    if not files:
        raise UsageError(
            f"dataset {dataset!r} matches no .jsonl, .jsonl.gz, .json or .parquet files; "
            "pass -d with a data file, a directory of them, or a glob"
        )
    kinds = {"parquet" if f.endswith(".parquet") else "json" for f in files}
    if len(kinds) > 1:
        raise UsageError(f"dataset {dataset!r} mixes Parquet and JSON files; point -d at one kind")
    return files


SYNTHETIC = "synthetic"  # `-d synthetic`: random tokens (benchmarks)


def check_dataset_source(dataset: str) -> None:
    """Fail early on a local dataset path that holds no data. Hub names are checked when loaded."""
    if dataset != SYNTHETIC and _looks_local(dataset):
        resolve_local_files(dataset)


def load_text_stream(dataset: str):
    """A streaming `datasets.IterableDataset` with a `text` column."""
    from datasets import load_dataset

    if _looks_local(dataset):
        files = resolve_local_files(dataset)
        builder = "parquet" if files[0].endswith(".parquet") else "json"
        return load_dataset(builder, data_files=files, split="train", streaming=True)
    try:
        return load_dataset(dataset, split="train", streaming=True)
    except Exception as e:  # offline, unknown name, gated repo: all surface as different library errors
        raise UsageError(
            f"could not open Hugging Face dataset {dataset!r} ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
            "if this machine is offline, pass -d with local JSONL/Parquet files, e.g. -d data/redpajama-sample"
        ) from None


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as e:
        raise UsageError(
            f"could not load tokenizer {name_or_path!r} ({type(e).__name__}); "
            "pass --tokenizer with a local tokenizer directory (the default is the shipped data/llama-tokenizer)"
        ) from None
    if tokenizer.eos_token_id is None:
        raise UsageError(f"tokenizer {name_or_path!r} has no EOS token; packing needs one to mark document ends")
    tokenizer.model_max_length = int(1e12)  # we pack long documents ourselves; silence the length warning
    return tokenizer


def tokenized_documents(dataset: str, tokenizer, dp_rank: int, dp_size: int):
    """This replica's share of the stream, tokenized (BOS from the tokenizer, EOS appended here)."""
    from datasets.distributed import split_dataset_by_node

    stream = split_dataset_by_node(load_text_stream(dataset), rank=dp_rank, world_size=dp_size)
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=True)["input_ids"]
        return {"input_ids": [doc + [eos] for doc in ids]}

    return stream.map(tokenize, batched=True, batch_size=64, remove_columns=stream.column_names)


class PackedRows:
    """Rows of exactly `seq_len` tokens, cut from the concatenated documents, epoch after epoch."""

    def __init__(self, documents, seq_len: int):
        self.documents = documents
        self.seq_len = seq_len
        self.buffer: list[int] = []
        self.epoch = 0
        self._resumed = False

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            self.documents.set_epoch(self.epoch)
            # A pass resumed from a checkpoint may start at the very end of an epoch and see nothing.
            resumed, self._resumed = self._resumed, False
            documents_seen = 0
            for example in self.documents:
                documents_seen += 1
                self.buffer.extend(example["input_ids"])
                while len(self.buffer) >= self.seq_len:
                    row, self.buffer = self.buffer[: self.seq_len], self.buffer[self.seq_len :]
                    yield row
            if documents_seen == 0 and not resumed:
                raise UsageError(
                    "the dataset has no documents for this data-parallel rank; use more data or fewer processes"
                )
            self.epoch += 1

    def state_dict(self) -> dict:
        # Taken between rows: the datasets iterator has consumed exactly the documents whose tokens
        # were either yielded or sit in the buffer.
        return {"documents": self.documents.state_dict(), "buffer": list(self.buffer), "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.documents.load_state_dict(state["documents"])
        self.buffer = list(state["buffer"])
        self.epoch = state["epoch"]
        self._resumed = True


class PretrainBatches:
    """Batches of packed rows as model inputs. Labels equal the inputs: the model shifts them."""

    def __init__(self, rows: PackedRows, batch_size: int):
        self.rows = rows
        self.batch_size = batch_size
        self._iterator = iter(rows)

    def next_batch(self) -> dict[str, torch.Tensor]:
        input_ids = torch.tensor([next(self._iterator) for _ in range(self.batch_size)], dtype=torch.long)
        return {"input_ids": input_ids, "labels": input_ids.clone()}

    @property
    def epoch(self) -> int:
        return self.rows.epoch

    def state_dict(self) -> dict:
        return self.rows.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.rows.load_state_dict(state)
        self._iterator = iter(self.rows)


class SyntheticBatches:
    """Uniformly random tokens, for benchmarks: the same shapes as real data, no input pipeline cost."""

    def __init__(self, vocab_size: int, seq_len: int, batch_size: int, seed: int):
        self.shape = (batch_size, seq_len)
        self.vocab_size = vocab_size
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        input_ids = torch.randint(0, self.vocab_size, self.shape, generator=self.generator)
        return {"input_ids": input_ids, "labels": input_ids.clone()}

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state().tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))


def build_pretrain_batches(
    dataset: str, tokenizer, seq_len: int, batch_size: int, dp_rank: int, dp_size: int
) -> PretrainBatches:
    documents = tokenized_documents(dataset, tokenizer, dp_rank, dp_size)
    return PretrainBatches(PackedRows(documents, seq_len), batch_size)


def count_tokens(dataset: str, tokenizer, dp_rank: int, dp_size: int, progress: bool) -> int:
    """Tokens (with BOS/EOS) in this replica's share of one epoch; sizes the LR schedule."""
    from tqdm import tqdm

    documents = tokenized_documents(dataset, tokenizer, dp_rank, dp_size)
    total = 0
    for example in tqdm(documents, desc="counting tokens to size the LR schedule", unit=" docs", disable=not progress):
        total += len(example["input_ids"])
    return total
