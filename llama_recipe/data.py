"""Pretraining data: stream RedPajama-style text, tokenize, append EOS, pack into full rows.

The stream comes from `datasets` in streaming mode: a Hugging Face dataset name, or local JSONL /
JSONL.gz / Parquet files with a `text` field. Each data-parallel replica reads its own part of the
stream (tensor- and pipeline-parallel ranks of one replica read the same part). Documents are
concatenated, each followed by EOS, and cut into rows of exactly `seq_len` tokens, so no compute is
spent on padding; leftover tokens wait in a buffer for the next row, so no token is dropped. Each
row carries position ids that restart at every document, for attention that respects documents.

`--data_mix arxiv=0.1,book=0.2,...` draws from the corpus's slices (RedPajama's arxiv, book, c4,
cc, github, stackexchange, wikipedia: the file names' prefix) so that each slice's share of the
trained tokens tracks its weight.

The position in the stream (the `datasets` iterator states, the leftover buffer, the mixture's
token counts and the epoch) is saved with every checkpoint, so a resumed run sees exactly the rows
the uninterrupted run would have seen. A background thread prepares batches ahead of the step.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import queue
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .config import SHIPPED_TOKENIZER, SYNTHETIC
from .errors import UsageError

LOCAL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet")
PREPARED_META = "meta.json"  # the file that marks a directory written by scripts/prepare_data.py (prepared.py)
MAX_WARNINGS = 5  # per process; the rest are only counted

# The LLaMA paper's pretraining mixture (Touvron et al. 2023, Table 1), by sampled tokens, with
# RedPajama's slice names.
LLAMA_MIX = {
    "cc": 0.67,
    "c4": 0.15,
    "github": 0.045,
    "wikipedia": 0.045,
    "book": 0.045,
    "arxiv": 0.025,
    "stackexchange": 0.02,
}


# ---------------------------------------------------------------------------------------------
# Sources


def is_prepared_dataset(path: str) -> bool:
    """Whether `path` is a directory written by `prepare_dataset` (it holds meta.json)."""
    return os.path.isfile(os.path.join(path, PREPARED_META))


def looks_local(dataset: str) -> bool:
    """Whether `-d` names local files (a path, a glob or a data file name) rather than a hub dataset."""
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


def dataset_kind(dataset: str) -> str:
    """What `-d` names: "synthetic", "prepared" (a prepare_data.py output), "local" files or a "hub" dataset."""
    if dataset == SYNTHETIC:
        return "synthetic"
    if is_prepared_dataset(dataset):
        return "prepared"
    return "local" if looks_local(dataset) else "hub"


def check_dataset_source(dataset: str) -> None:
    """Fail early on a local dataset path that holds no data. Hub names are checked when loaded."""
    if dataset_kind(dataset) == "local":
        resolve_local_files(dataset)


def slice_name(file: str) -> str:
    """RedPajama's slice of a file, from its name: `arxiv_024.jsonl` -> `arxiv`."""
    name = Path(file).name
    for suffix in LOCAL_SUFFIXES:
        name = name.removesuffix(suffix)
    return name.split("_")[0].split("-")[0].lower()


SKIPPED: dict[str, int] = {}  # reason -> count, in this process


def _skip(file: str, line: int, reason: str) -> None:
    SKIPPED[reason] = SKIPPED.get(reason, 0) + 1
    if sum(SKIPPED.values()) <= MAX_WARNINGS:
        rank = os.environ.get("RANK", "0")
        sys.stderr.write(f"warning (rank {rank}): {file} line {line}: {reason}; skipped\n")


def read_jsonl_documents(files: list[str]) -> Iterator[dict]:
    """Documents of JSON-lines files (optionally gzipped). Lines that are not valid UTF-8 JSON
    objects with a non-empty string `text` are skipped and counted: one bad line in a terabyte
    must not stop a run."""
    for file in files:
        opener = gzip.open if file.endswith(".gz") else open
        with opener(file, "rb") as f:
            for number, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    _skip(file, number, "not valid UTF-8")
                    continue
                except json.JSONDecodeError:
                    _skip(file, number, "not valid JSON")
                    continue
                text = row.get("text") if isinstance(row, dict) else None
                if not isinstance(text, str):
                    _skip(file, number, "no text field")
                elif not text.strip():
                    _skip(file, number, "empty text")
                else:
                    yield {"text": text}


def _usable(row: dict) -> bool:
    """For Parquet and hub rows, which bypass our JSONL reader: count what is dropped, as it does."""
    if not isinstance(row["text"], str):
        SKIPPED["no text field"] = SKIPPED.get("no text field", 0) + 1
        return False
    if not row["text"].strip():
        SKIPPED["empty text"] = SKIPPED.get("empty text", 0) + 1
        return False
    return True


def load_text_stream(dataset: str, files: list[str] | None = None):
    """A streaming `datasets.IterableDataset` with a `text` column: one shard per local file, so
    data-parallel replicas split the corpus by file when the file count allows."""
    from datasets import IterableDataset, load_dataset

    if looks_local(dataset) or files:
        files = files or resolve_local_files(dataset)
        if files[0].endswith(".parquet"):  # null or blank text would train on a bare [BOS, EOS]
            return (
                load_dataset("parquet", data_files=files, split="train", streaming=True)
                .select_columns(["text"])
                .filter(_usable)
            )
        return IterableDataset.from_generator(read_jsonl_documents, gen_kwargs={"files": files})
    try:
        return load_dataset(dataset, split="train", streaming=True).filter(_usable)
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


def load_model_tokenizer(model_dir: Path, override: str | None = None):
    """For a pretrained model: --tokenizer if given, else the one saved with the model (our
    checkpoints and exports carry it), else the shipped LLaMA tokenizer."""
    has_own = (Path(model_dir) / "tokenizer_config.json").is_file()
    return load_tokenizer(override or str(model_dir if has_own else SHIPPED_TOKENIZER))


def tokenize_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """BOS + tokens + EOS per document. `split_special_tokens`: a literal "</s>" in raw web text is
    text, not an end of document."""
    ids = tokenizer(texts, add_special_tokens=True, split_special_tokens=True)["input_ids"]
    return [doc + [tokenizer.eos_token_id] for doc in ids]


def _tokenized(stream, tokenizer, dp_rank: int, dp_size: int):
    from datasets.distributed import split_dataset_by_node

    stream = split_dataset_by_node(stream, rank=dp_rank, world_size=dp_size)
    return stream.map(
        lambda batch: {"input_ids": tokenize_texts(tokenizer, batch["text"])},
        batched=True,
        batch_size=64,
        remove_columns=["text"],
    )


def tokenized_documents(dataset: str, tokenizer, dp_rank: int, dp_size: int):
    """This replica's share of the stream, tokenized."""
    return _tokenized(load_text_stream(dataset), tokenizer, dp_rank, dp_size)


# ---------------------------------------------------------------------------------------------
# Mixtures


def parse_data_mix(spec: str) -> dict[str, float]:
    """`arxiv=0.1,book=0.2,...` (or `llama` for the LLaMA paper's mixture) -> normalised weights."""
    if spec.strip().lower() == "llama":
        return dict(LLAMA_MIX)
    weights = {}
    for part in spec.split(","):
        name, _, value = part.partition("=")
        try:
            weights[name.strip().lower()] = float(value)
        except ValueError:
            raise UsageError(
                f"--data_mix {spec!r}: {part!r} is not slice=weight; write e.g. arxiv=0.1,book=0.2"
            ) from None
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise UsageError(f"--data_mix {spec!r}: weights must be non-negative and not all zero")
    total = sum(weights.values())
    return {name: w / total for name, w in weights.items() if w > 0}


def files_by_slice(dataset: str, weights: dict[str, float]) -> dict[str, list[str]]:
    if not looks_local(dataset):
        raise UsageError("--data_mix needs local files (slices are named by file); download them and pass -d DIR")
    files = resolve_local_files(dataset)
    groups: dict[str, list[str]] = {}
    for f in files:
        groups.setdefault(slice_name(f), []).append(f)
    missing = sorted(set(weights) - set(groups))
    if missing:
        raise UsageError(
            f"--data_mix names slice(s) {', '.join(missing)} that {dataset} does not have (it has: {', '.join(sorted(groups))})"
        )
    return {name: groups[name] for name in weights}


class MixedDocuments:
    """Documents from several slices, in an order that keeps each slice's share of tokens close to
    its weight: the next document comes from the slice furthest below its target. Deterministic, so
    the mixture is the same on every run and resumes exactly. A slice that runs out starts over.
    It never ends: set the run's length with --max_steps."""

    def __init__(self, slices: dict, weights: dict[str, float]):
        self.slices, self.weights = slices, weights
        self.tokens = dict.fromkeys(slices, 0)
        self.epochs = dict.fromkeys(slices, 0)
        self._iterators: dict[str, Iterator] = {}

    def set_epoch(self, epoch: int) -> None:
        pass  # each slice keeps its own epoch

    def _next_from(self, name: str) -> dict:
        while True:
            if name not in self._iterators:
                self.slices[name].set_epoch(self.epochs[name])
                self._iterators[name] = iter(self.slices[name])
            try:
                return next(self._iterators[name])
            except StopIteration:
                del self._iterators[name]
                self.epochs[name] += 1

    def __iter__(self) -> Iterator[dict]:
        while True:
            total = sum(self.tokens.values())
            name = max(self.slices, key=lambda s: self.weights[s] * (total + 1) - self.tokens[s])
            example = self._next_from(name)
            self.tokens[name] += len(example["input_ids"])
            yield example

    def state_dict(self) -> dict:
        return {
            "tokens": dict(self.tokens),
            "epochs": dict(self.epochs),
            "slices": {name: ds.state_dict() for name, ds in self.slices.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.tokens, self.epochs = dict(state["tokens"]), dict(state["epochs"])
        for name, ds in self.slices.items():
            ds.set_epoch(self.epochs[name])
            ds.load_state_dict(state["slices"][name])
        self._iterators = {}


# ---------------------------------------------------------------------------------------------
# Packing


def document_positions(tokens: np.ndarray, first_position: int, eos_id: int) -> np.ndarray:
    """Position of each token within its document: +1 per token, back to 0 after every EOS. The
    first tokens continue the document that began before them, at `first_position`."""
    n = len(tokens)
    index = np.arange(n)
    starts = np.flatnonzero(tokens[:-1] == eos_id) + 1
    last_start = np.zeros(n, dtype=np.int64)
    last_start[starts] = starts
    last_start = np.maximum.accumulate(last_start)
    positions = index - last_start
    continuing = index < (starts[0] if len(starts) else n)
    positions[continuing] += first_position
    return positions


class PackedRows:
    """Rows of exactly `seq_len` tokens (with their document positions), cut from the concatenated
    documents, epoch after epoch."""

    def __init__(self, documents, seq_len: int, eos_id: int):
        self.documents = documents
        self.seq_len = seq_len
        self.eos_id = eos_id
        self.buffer: list[int] = []
        self.next_position = 0  # document position of buffer[0]
        self.epoch = 0
        self._resumed = False

    def __iter__(self) -> Iterator[tuple[list[int], np.ndarray]]:
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
                    positions = document_positions(np.asarray(row), self.next_position, self.eos_id)
                    self.next_position = 0 if row[-1] == self.eos_id else int(positions[-1]) + 1
                    yield row, positions
            if documents_seen == 0 and not resumed:
                raise UsageError(
                    "the dataset has no documents for this data-parallel rank; use more data or fewer processes"
                )
            self.epoch += 1

    def state_dict(self) -> dict:
        # Taken between rows: the datasets iterator has consumed exactly the documents whose tokens
        # were either yielded or sit in the buffer.
        return {
            "documents": self.documents.state_dict(),
            "buffer": list(self.buffer),
            "next_position": self.next_position,
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict) -> None:
        self.documents.load_state_dict(state["documents"])
        self.buffer = list(state["buffer"])
        self.next_position = state["next_position"]
        self.epoch = state["epoch"]
        self._resumed = True


class PretrainBatches:
    """Batches of packed rows as model inputs. Labels equal the inputs: the model shifts them."""

    def __init__(self, rows: PackedRows, batch_size: int):
        self.rows = rows
        self.batch_size = batch_size
        self._iterator = iter(rows)

    def next_batch(self) -> dict[str, torch.Tensor]:
        rows = [next(self._iterator) for _ in range(self.batch_size)]
        input_ids = torch.tensor([tokens for tokens, _ in rows], dtype=torch.long)
        position_ids = torch.from_numpy(np.stack([positions for _, positions in rows])).long()
        return {"input_ids": input_ids, "labels": input_ids.clone(), "position_ids": position_ids}

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


class Prefetcher:
    """Prepares the next batches on a background thread while the model trains on this one.

    The source's state is recorded with every batch it produces, and `state_dict()` returns the
    state after the last batch the *trainer* took, so checkpoints stay exact despite read-ahead.
    """

    def __init__(self, source, depth: int = 2):
        self.source = source
        self.depth = depth
        self._state = source.state_dict()
        self._epoch = source.epoch
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def _produce(self, out: queue.Queue, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                item = (self.source.next_batch(), self.source.state_dict(), self.source.epoch, None)
            except BaseException as e:  # hand errors (e.g. an empty dataset) to the trainer
                item = (None, None, None, e)
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[3] is not None:
                return

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self._queue is None:
            self._queue, self._stop = queue.Queue(maxsize=self.depth), threading.Event()
            self._thread = threading.Thread(target=self._produce, args=(self._queue, self._stop), daemon=True)
            self._thread.start()
        batch, state, epoch, error = self._queue.get()
        if error is not None:
            raise error
        self._state, self._epoch = state, epoch
        return batch

    @property
    def epoch(self) -> int:
        return self._epoch

    def state_dict(self) -> dict:
        return self._state

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.source.load_state_dict(state)
        self._state, self._epoch = self.source.state_dict(), self.source.epoch

    def close(self) -> None:
        """Stop reading ahead. Batches already prepared are dropped; the source is left wherever
        the thread stopped, so only load_state_dict() should follow."""
        if self._stop is not None:
            self._stop.set()
            self._thread.join(timeout=30)  # let it finish the batch in hand before the process moves on
            self._queue, self._stop, self._thread = None, None, None


# ---------------------------------------------------------------------------------------------
# Entry points


def build_pretrain_batches(
    dataset: str,
    tokenizer,
    seq_len: int,
    batch_size: int,
    dp_rank: int,
    dp_size: int,
    data_mix: str | None = None,
) -> PretrainBatches:
    """Packed batches from a stream (or a weighted mixture of its slices) for one replica."""
    if data_mix:
        weights = parse_data_mix(data_mix)
        slices = {
            name: _tokenized(load_text_stream(dataset, files), tokenizer, dp_rank, dp_size)
            for name, files in files_by_slice(dataset, weights).items()
        }
        documents = MixedDocuments(slices, weights)
    else:
        documents = tokenized_documents(dataset, tokenizer, dp_rank, dp_size)
    return PretrainBatches(PackedRows(documents, seq_len, tokenizer.eos_token_id), batch_size)


def count_tokens(dataset: str, tokenizer, dp_rank: int, dp_size: int, progress: bool) -> int:
    """Tokens (with BOS/EOS) in this replica's share of one epoch; sizes the LR schedule."""
    documents = tokenized_documents(dataset, tokenizer, dp_rank, dp_size)
    total = 0
    for example in tqdm(documents, desc="counting tokens to size the LR schedule", unit=" docs", disable=not progress):
        total += len(example["input_ids"])
    SKIPPED.clear()  # training reads the same lines again and reports them then
    return total
