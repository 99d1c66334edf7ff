"""Offline pretraining data, Megatron-style: tokenize a corpus once, then train from a memory-mapped file.

    python scripts/prepare_data.py -d data/redpajama-sample -o data/redpajama-prepared
    python pretrain.py -d data/redpajama-prepared ...

`prepare_dataset` reads the same documents as the streaming path (`load_text_stream`), tokenizes them
the same way (BOS from the tokenizer, EOS appended) and writes into OUT_DIR:

    tokens.bin       every document's tokens, one after the other: raw little-endian uint16 (uint32 for
                     vocabularies over 65536 tokens), so it can be memory-mapped without parsing
    doc_offsets.npy  int64, where each document starts in tokens.bin, plus the total at the end
    meta.json        dtype, counts, the largest token id, tokenizer identity and source; written last, so it
                     marks a finished prepare

`PreparedBatches` cuts tokens.bin into consecutive rows of `seq_len` tokens and deals them out to the
data-parallel replicas. Its position is two integers (epoch and row), so resuming costs nothing and
reading needs no tokenizer, no Python loop over documents and no more memory than one batch.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from itertools import chain
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .data import tokenize_texts
from .errors import UsageError
from .files import move_into_place
from .sources import PREPARED_META, SKIPPED, Source, is_prepared_dataset, load_text_stream, resolve_source

TOKENS_FILE = "tokens.bin"
OFFSETS_FILE = "doc_offsets.npy"
FORMAT_VERSION = 1
TOKENIZE_BATCH = 256  # documents per call of the fast tokenizer: big enough to amortise the call, small in memory
_COPY_CHUNK = 1 << 20  # offsets copied per step when turning the raw offsets file into .npy
_SCAN_CHUNK = 1 << 24  # tokens per step when a dataset without a recorded largest id is scanned for it
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}  # explicit byte order: the file is portable


def token_dtype(vocab_size: int) -> str:
    """The smallest dtype that holds every token id: uint16 halves the file for vocabularies up to 65536."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def read_meta(path: str) -> dict:
    """meta.json of a prepared dataset, checked to be one this code can read."""
    if not is_prepared_dataset(path):
        raise UsageError(
            f"{path!r} is not a prepared dataset (no {PREPARED_META}); "
            f"run scripts/prepare_data.py -d INPUT -o {path} first, or pass -d with the raw data"
        )
    meta_path = os.path.join(path, PREPARED_META)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except json.JSONDecodeError:
        raise UsageError(f"{meta_path} is not valid JSON; prepare the dataset again") from None
    if not isinstance(meta, dict):
        raise UsageError(f"{meta_path} is not a JSON object; prepare the dataset again")
    if meta.get("format_version") != FORMAT_VERSION or meta.get("dtype") not in _DTYPES:
        raise UsageError(
            f"{path!r} has prepared-data format {meta.get('format_version')!r} (dtype {meta.get('dtype')!r}); "
            f"this code reads format {FORMAT_VERSION}: prepare it again with this version of scripts/prepare_data.py"
        )
    for key in ("num_tokens", "num_docs", "vocab_size", "eos_token_id"):
        if type(meta.get(key)) is not int or meta[key] < 0:
            raise UsageError(f"{meta_path} has no valid {key!r} (got {meta.get(key)!r}); prepare the dataset again")
    return meta


def check_prepared_files(path: str, meta: dict | None = None) -> np.ndarray:
    """The token file has the size meta.json says and the offsets match it (a truncated or foreign
    copy would otherwise fail deep inside numpy); returns the memory-mapped offsets."""
    meta = meta or read_meta(path)
    tokens_path = os.path.join(path, TOKENS_FILE)
    size = os.path.getsize(tokens_path) if os.path.isfile(tokens_path) else None
    if size != meta["num_tokens"] * _DTYPES[meta["dtype"]].itemsize:
        raise UsageError(
            f"{tokens_path} holds {size} bytes but {PREPARED_META} says {meta['num_tokens']} {meta['dtype']} tokens; "
            "the directory is damaged: prepare it again"
        )
    try:
        offsets = np.load(os.path.join(path, OFFSETS_FILE), mmap_mode="r", allow_pickle=False)
        assert offsets.shape == (meta["num_docs"] + 1,) and offsets[-1] == meta["num_tokens"]
    except (OSError, ValueError, AssertionError):  # missing, truncated, or not this dataset's offsets
        raise UsageError(
            f"{os.path.join(path, OFFSETS_FILE)} is missing or does not match {PREPARED_META}; the directory is "
            "damaged: prepare it again"
        ) from None
    return offsets


def prepared_documents(path: str) -> Iterator[np.ndarray]:
    """Each document's tokens as written (BOS, the text's tokens, EOS), in order."""
    meta = read_meta(path)
    offsets = check_prepared_files(path, meta)
    tokens = np.memmap(os.path.join(path, TOKENS_FILE), dtype=_DTYPES[meta["dtype"]], mode="r")
    for start, end in zip(offsets[:-1], offsets[1:], strict=True):
        yield np.asarray(tokens[start:end], dtype=np.int64)


def check_data_position(path: str, state: dict, where: str) -> int:
    """A saved position (`PreparedBatches.state_dict`) within the rows of the prepared dataset at
    `path`; returns the positions of its epoch's order already read. `where`: what the state was read
    from, for the one-line UsageError that names the field otherwise."""
    for key in ("epoch", "row", "dp_size", "seq_len"):
        if type(state.get(key)) is not int or state[key] < (1 if key in ("dp_size", "seq_len") else 0):
            raise UsageError(
                f"{where}: {key} is {str(state.get(key))[:40]}; it is corrupt: resume from another checkpoint"
            )
    rows = read_meta(path)["num_tokens"] // state["seq_len"]
    read = state["row"] * state["dp_size"]  # positions of this epoch's order already read, by every replica
    if read > rows:
        raise UsageError(
            f"{where}: row {state['row']} x dp_size {state['dp_size']} is position {read}, past the {rows} rows of "
            f"{path!r}; resume with the prepared dataset the run started with"
        )
    return read


def check_token_ids(path: str, vocab_size: int) -> None:
    """Every token id is below the model's vocabulary (an id at or above it fails inside the embedding,
    mid-run). The largest id is recorded in meta.json when the dataset is prepared, so this costs
    nothing; a dataset prepared before that (or written by other tools) is scanned once here, in
    chunks, which reads all of tokens.bin."""
    meta = read_meta(path)
    largest = meta.get("max_token_id")
    if type(largest) is not int:
        tokens = np.memmap(os.path.join(path, TOKENS_FILE), dtype=_DTYPES[meta["dtype"]], mode="r")
        largest = max((int(tokens[i : i + _SCAN_CHUNK].max()) for i in range(0, len(tokens), _SCAN_CHUNK)), default=0)
    if largest >= vocab_size:
        raise UsageError(
            f"{os.path.join(path, TOKENS_FILE)} holds token id {largest}, but the model has {vocab_size} tokens: it was "
            f"prepared with another tokenizer or vocabulary; prepare it again with the model's tokenizer "
            f"(scripts/prepare_data.py), or train a model whose vocab_size covers it"
        )


def check_prepared_tokenizer(path: str, tokenizer) -> None:
    """Fail if the dataset was tokenized with another tokenizer: the ids would mean other words."""
    meta = read_meta(path)
    prepared = (meta["vocab_size"], meta["eos_token_id"])
    current = (len(tokenizer), tokenizer.eos_token_id)
    if prepared != current:
        raise UsageError(
            f"{path!r} was prepared with tokenizer {meta.get('tokenizer')!r} (vocab {prepared[0]}, EOS {prepared[1]}) "
            f"but this run uses {tokenizer.name_or_path!r} (vocab {current[0]}, EOS {current[1]}); "
            f"pass --tokenizer {meta.get('tokenizer')} (the one it was prepared with), or prepare it again"
        )


def check_out_dir(out_dir: str, overwrite: bool) -> None:
    """Refuse to write over something: a non-empty OUT_DIR only with `overwrite`, and only if it is prepared data."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out_dir!r} exists and is not a directory; pass -o with a new directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UsageError(f"output directory {out_dir!r} exists and is not empty; pass --overwrite to replace it")
        if not is_prepared_dataset(out_dir):  # --overwrite deletes it: never do that to a directory we did not write
            raise UsageError(
                f"output directory {out_dir!r} is not empty and not a prepared dataset; "
                "--overwrite only replaces prepared datasets: pass -o with a new directory"
            )


def prepare_dataset(
    dataset: Source | str,
    out_dir: str,
    tokenizer,
    progress: bool = True,
    overwrite: bool = False,
    max_tokens: int | None = None,
) -> dict:
    """Tokenize `dataset` (any form `pretrain.py -d` takes, hub names included) into `out_dir`, whole
    documents up to `max_tokens` tokens if given. Returns counts and speed.

    Documents whose `text` is empty, blank or not a string are skipped and counted, as the JSONL reader
    skips them. Everything is written into the sibling `.OUT_DIR.tmp` and renamed into place at the end,
    so an interrupted prepare never leaves a directory that looks prepared.
    """
    check_out_dir(out_dir, overwrite)
    source = resolve_source(dataset) if isinstance(dataset, str) else dataset
    out = Path(out_dir).expanduser().resolve()
    tmp = out.parent / f".{out.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)  # left behind by an interrupted prepare
    tmp.mkdir(parents=True)
    dtype = token_dtype(len(tokenizer))  # added tokens included: every id is below len(tokenizer)
    skipped_by_reader = sum(SKIPPED.values())  # a process-wide count: take the difference
    start = time.perf_counter()
    try:
        num_docs, num_tokens, skipped, max_id = _write_tokens(source, tokenizer, tmp, dtype, max_tokens, progress)
        skipped += sum(SKIPPED.values()) - skipped_by_reader
        if num_docs == 0:
            raise UsageError(f"dataset {source.name!r} has no documents with non-empty text ({skipped} skipped)")
        _raw_to_npy(tmp / "doc_offsets.raw", tmp / OFFSETS_FILE, num_docs + 1)
        meta = {
            "format_version": FORMAT_VERSION,
            "dtype": dtype,
            "num_tokens": num_tokens,
            "num_docs": num_docs,
            "vocab_size": len(tokenizer),
            "max_token_id": max_id,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "tokenizer": tokenizer.name_or_path,
            "source": source.name,
        }
        with open(tmp / PREPARED_META, "w") as f:  # last: its presence means the files above are complete
            json.dump(meta, f, indent=2)
        move_into_place(tmp, out)  # an old prepared OUT_DIR (--overwrite) is set aside first
    except BaseException:  # Ctrl-C included: leave nothing half-written behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start
    return {
        "num_docs": num_docs,
        "num_tokens": num_tokens,
        "skipped": skipped,
        "seconds": seconds,
        "tokens_per_s": num_tokens / max(seconds, 1e-9),
    }


def _write_tokens(
    source: Source, tokenizer, tmp: Path, dtype: str, max_tokens: int | None, progress: bool
) -> tuple[int, int, int, int]:
    """Stream, tokenize and append every document to tmp/tokens.bin, its start to tmp/doc_offsets.raw
    (the .npy needs its length up front). Returns (documents, tokens, documents skipped here, the
    largest token id)."""
    num_docs = num_tokens = skipped = max_id = 0
    with (
        open(tmp / TOKENS_FILE, "wb") as tokens_file,
        open(tmp / "doc_offsets.raw", "wb") as offsets_file,
        tqdm(desc=f"preparing {source.name}", unit=" docs", disable=not progress) as bar,
    ):
        for batch in load_text_stream(source).iter(batch_size=TOKENIZE_BATCH):
            # The JSONL reader already drops (and counts) such lines; Parquet and hub rows arrive as they are.
            texts = [t for t in batch["text"] if isinstance(t, str) and t.strip()]
            skipped += len(batch["text"]) - len(texts)
            bar.update(len(batch["text"]))
            if not texts:
                continue
            ids = tokenize_texts(tokenizer, texts)  # the streaming path's tokenization: BOS ... EOS
            if max_tokens is not None:  # whole documents, as many as fit
                ids = ids[: int((np.cumsum([len(doc) for doc in ids]) <= max_tokens - num_tokens).sum())]
                if not ids:
                    break
            lengths = np.fromiter((len(doc) for doc in ids), dtype=np.int64, count=len(ids))
            (num_tokens + np.cumsum(lengths) - lengths).astype("<i8").tofile(offsets_file)
            tokens = np.fromiter(chain.from_iterable(ids), _DTYPES[dtype], int(lengths.sum()))
            tokens.tofile(tokens_file)
            max_id = max(max_id, int(tokens.max()))
            num_docs += len(ids)
            num_tokens += int(lengths.sum())
            bar.set_postfix(tokens=f"{num_tokens:,}", refresh=False)
        np.array([num_tokens], dtype="<i8").tofile(offsets_file)  # the final total closes the last document
    return num_docs, num_tokens, skipped, max_id


def _raw_to_npy(raw_path: Path, npy_path: Path, length: int) -> None:
    """Copy raw int64 offsets into a .npy file in chunks (its header needs the length, known only at the end)."""
    raw = np.memmap(raw_path, dtype="<i8", mode="r", shape=(length,))
    npy = np.lib.format.open_memmap(npy_path, mode="w+", dtype="<i8", shape=(length,))
    for i in range(0, length, _COPY_CHUNK):
        npy[i : i + _COPY_CHUNK] = raw[i : i + _COPY_CHUNK]
    npy.flush()
    del raw, npy
    os.remove(raw_path)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-spread 64-bit hash of each element (uint64 arithmetic wraps)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permute(index: np.ndarray, n: int, key: int) -> np.ndarray:
    """A random-looking bijection of [0, n), keyed: where each of `index` goes. A 4-round Feistel
    network on the smallest even number of bits that covers n, with cycle-walking for the values it
    maps past n, so it needs no memory however many rows a corpus has (a stored permutation of a
    trillion-token corpus's rows would take gigabytes)."""
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = [np.uint64((key * 4 + r) * 0x9E3779B97F4A7C15 % 2**64) for r in range(4)]

    def rounds(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(half), x & mask
        for k in keys:
            left, right = right, left ^ (_mix64(right ^ k) & mask)
        return (left << np.uint64(half)) | right

    out = rounds(np.asarray(index, dtype=np.uint64))
    while (outside := out >= np.uint64(n)).any():  # walk the cycle back into [0, n)
        out[outside] = rounds(out[outside])
    return out.astype(np.int64)


class PreparedBatches:
    """Batches of `seq_len`-token rows of a prepared dataset, for one data-parallel replica.

    Row r is tokens[r * seq_len : (r + 1) * seq_len]; an epoch has num_tokens // seq_len rows, so the
    final partial row (fewer than seq_len tokens) is not used. Each epoch visits the rows in an order
    drawn from (seed, epoch) (`shuffle=False`: in file order); replica k takes positions k, k + dp_size,
    k + 2 * dp_size, ... of that order: num_rows // dp_size rows each, so every row is read once per
    epoch by one replica and all replicas have equally many (the up to dp_size - 1 rows left over are
    not used). When a replica's rows run out the epoch increments; like `PretrainBatches`, that happens
    when the next row is asked for, and a batch may span two epochs.

    `input_ids` and `labels` are equal (the model shifts); `position_ids` count from 0 at the start of
    each document (the token after each EOS), also where a document began in an earlier row.
    """

    def __init__(
        self, path: str, seq_len: int, batch_size: int, dp_rank: int, dp_size: int, seed: int = 0, shuffle: bool = False
    ):
        if seq_len < 1 or batch_size < 1 or not 0 <= dp_rank < dp_size:
            raise UsageError(f"bad layout: seq_len={seq_len} batch_size={batch_size} dp_rank={dp_rank}/{dp_size}")
        self.meta = read_meta(path)
        self.path = path
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed, self.shuffle = seed, shuffle

        num_tokens = self.meta["num_tokens"]
        self.doc_offsets = check_prepared_files(path, self.meta)
        num_rows = num_tokens // seq_len
        if num_rows < dp_size * batch_size:
            raise UsageError(
                f"{path!r} has {num_tokens} tokens: {num_rows} rows of {seq_len}, fewer than one batch for each "
                f"data-parallel replica ({dp_size} x {batch_size}); use more data, a smaller -b or -l, or fewer processes"
            )
        self.num_rows = num_rows
        self.rows_per_replica = num_rows // dp_size
        # Memory-mapped, read-only: the OS pages in what a batch touches, the file is never loaded whole.
        tokens_path = os.path.join(path, TOKENS_FILE)
        self.tokens = np.memmap(tokens_path, dtype=_DTYPES[self.meta["dtype"]], mode="r", shape=(num_tokens,))
        self._positions = np.arange(seq_len, dtype=np.int64)
        self._epoch = 0
        self.row = 0  # the next row of this replica's share, 0 .. rows_per_replica - 1
        self.provenance: dict = {}  # the last batch's rows (see next_batch)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def batches_per_epoch(self) -> int:
        """Whole batches in one epoch of this replica (every replica has the same number)."""
        return self.rows_per_replica // self.batch_size

    def next_batch(self) -> dict[str, torch.Tensor]:
        epochs, positions = np.empty(self.batch_size, dtype=np.int64), np.empty(self.batch_size, dtype=np.int64)
        for i in range(self.batch_size):
            if self.row == self.rows_per_replica:  # this replica's share is used up: the next epoch starts over
                self._epoch += 1
                self.row = 0
            epochs[i], positions[i] = self._epoch, self.dp_rank + self.row * self.dp_size
            self.row += 1
        rows = positions.copy()
        for epoch in np.unique(epochs):  # one vectorised permutation per epoch the batch touches
            rows[epochs == epoch] = self.rows_at(int(epoch), positions[epochs == epoch])
        starts = rows * self.seq_len
        self.provenance = {"rows": rows.tolist()}  # for the data ledger: row r is tokens r*seq_len..(r+1)*seq_len
        input_ids = np.stack([self.tokens[s : s + self.seq_len] for s in starts]).astype(np.int64)

        # Document-relative positions: the document holding global token g starts at the last offset <= g.
        index = starts[:, None] + self._positions
        doc = np.searchsorted(self.doc_offsets, index, side="right") - 1
        position_ids = np.asarray(index - self.doc_offsets[doc])

        input_ids = torch.from_numpy(input_ids)
        return {"input_ids": input_ids, "labels": input_ids.clone(), "position_ids": torch.from_numpy(position_ids)}

    def rows_at(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        """The rows read at `positions` of epoch `epoch`'s order."""
        if not self.shuffle:
            return positions
        return permute(positions, self.num_rows, key=self.seed * 1_000_003 + epoch)

    def state_dict(self) -> dict:
        # The layout and order travel with the position: the same index means other tokens under another one.
        return {
            "epoch": self._epoch,
            "row": self.row,
            "dp_size": self.dp_size,
            "seq_len": self.seq_len,
            "shuffle": self.shuffle,
            "seed": self.seed,
        }

    def load_elastic(self, states: list[dict], dp_size: int) -> None:
        """From another layout: the position is global, so any replica's state is the run's."""
        self.load_state_dict(states[0])

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved position, also one saved under another number of replicas: the epoch's
        first row * dp_size positions of the order are read (every replica had read `row` rows), so
        each replica here continues at its first position not yet read; nothing is read twice or skipped."""
        fixes = {"seq_len": "-l", "shuffle": "--shuffle_buffer (0 or not)", "seed": "--seed"}
        for key, fix in fixes.items():
            current = getattr(self, key)
            if state.get(key, current) != current:
                raise UsageError(
                    f"the checkpoint's data position was saved with {key}={state[key]}, this run has {key}={current}; "
                    f"resume with the same {fix}"
                )
        read = check_data_position(self.path, state, "the checkpoint's data position")
        self._epoch = int(state["epoch"])
        self.row = min(-(-(read - self.dp_rank) // self.dp_size), self.rows_per_replica)  # ceil((read - rank) / dp)
