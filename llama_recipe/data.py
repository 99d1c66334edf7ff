"""Pretraining data: stream RedPajama-style text, tokenize, append EOS, pack into full rows.

The stream comes from `datasets` in streaming mode: a Hugging Face dataset name, or local JSONL /
JSONL.gz / Parquet files with a `text` field. Each data-parallel replica reads its own part of the
stream (tensor- and pipeline-parallel ranks of one replica read the same part). The order is
shuffled (`DocumentStream`): the files in a new order every epoch, the documents drawn at random
from a buffer of `--shuffle_buffer` texts. Documents are concatenated, each followed by EOS, and cut
into rows of exactly `seq_len` tokens, so no compute is spent on padding; leftover tokens wait in a
buffer for the next row, so no token is dropped. The rows are drawn at random from a second buffer of
`--shuffle_buffer` rows (`PackedRows`), so a book's hundreds of rows do not fill batches in a row.
Each row carries position ids that restart at every document, for attention that respects documents.

`--data_mix arxiv=0.1,book=0.2,...` draws from the corpus's slices (RedPajama's arxiv, book, c4,
cc, github, stackexchange, wikipedia: the file names' prefix) so that each slice's share of the
trained tokens tracks its weight.

The position in the stream (the `datasets` iterator states, the document and row shuffle buffers and
their generators, the leftover tokens, the mixture's token counts and the epoch) is saved with every
checkpoint, so a resumed run sees exactly the rows the uninterrupted run would have seen. A background
thread prepares batches ahead of the step.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .config import SHIPPED_TOKENIZER
from .document_order import FileInterleave, Ref, document, read_texts
from .errors import UsageError
from .sources import SKIPPED, Source, looks_like_a_path, missing_path, resolve_source, slice_name

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


def check_tokenizer_name(name_or_path: str) -> None:
    """A --tokenizer that reads as a local path but does not exist, refused at once (transformers
    would first look it up on the hub, retrying for about a minute when offline)."""
    if not Path(name_or_path).expanduser().exists() and looks_like_a_path(name_or_path):
        raise UsageError(missing_path(name_or_path, "--tokenizer") + "; pass --tokenizer with a tokenizer directory")


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    check_tokenizer_name(name_or_path)
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


class DocumentStream:
    """This replica's documents, tokenized, epoch after epoch, in a shuffled order that resumes
    exactly, also on another number of replicas.

    An epoch's documents come in the order `FileInterleave` draws from (seed, epoch): many files at
    once, each in proportion to what it holds; the same order on every replica. The replicas deal
    it out: the g-th document goes to replica g mod dp_size, so every document goes to exactly one
    replica per epoch, and every replica sees every file. (Each replica reads all files to keep its
    place; it parses only its own documents.) They then pass through a buffer of `shuffle_buffer`
    documents from which the next one is drawn at random; at the end of an epoch the buffer empties
    before the next epoch starts. `shuffle_buffer=0`: the files one after another in their own order.

    The state is small: the epoch's position (`g`, the documents dealt so far, and the open files'
    records), the buffer as (file, record, offset) references, read again on resume, and the
    generator's state. `load_elastic` continues from the states of another number of replicas.
    """

    def __init__(
        self,
        source: Source | str,
        tokenizer,
        dp_rank: int,
        dp_size: int,
        files: list[str] | None = None,
        seed: int = 0,
        shuffle_buffer: int = 0,
        stream_id: int = 0,
        only_slice: str | None = None,
    ):
        self.source = resolve_source(source) if isinstance(source, str) else source
        if self.source.files is None:
            raise UsageError(
                f"{self.source.name} has no JSON-lines or Parquet data files to stream, only its own builder: prepare it "
                "once with scripts/prepare_data.py (which reads builders) and pass -d with the prepared directory"
            )
        self.tokenizer, self.dp_rank, self.dp_size = tokenizer, dp_rank, dp_size
        index = {name: i for i, name in enumerate(self.source.files)}
        self.files = [index[name] for name in (files if files is not None else self.source.files)]
        self.seed, self.shuffle_buffer, self.stream_id = seed, shuffle_buffer, stream_id
        self.only_slice = only_slice  # a mixture's slice named by a row field: keep only its documents
        self.rng = np.random.default_rng([seed, dp_rank, stream_id])  # the buffer's draws
        self.epoch = 0
        self.g = 0  # documents of this epoch's order dealt so far (to any replica)
        self.base, self.deal = 0, dp_size  # from document `base` on, every `deal`-th is this replica's
        self.buffer: list[tuple[Ref, str]] = []
        self.order: FileInterleave | None = None  # the epoch being read
        self._resume_order: dict | None = None  # its position, when resumed before the epoch is opened again
        self.quarantine: frozenset[tuple[int, int]] = frozenset()  # (file, record)s never to deal again

    def set_quarantine(self, quarantine: frozenset[tuple[int, int]]) -> None:
        """Deal none of these documents again, and drop those waiting in the buffer."""
        self.quarantine = quarantine
        self.buffer = [(ref, text) for ref, text in self.buffer if ref[:2] not in quarantine]

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.g, self.base, self.deal = epoch, 0, 0, self.dp_size
            self.order, self._resume_order = None, None

    def _order(self, epoch: int, position: dict | None = None) -> FileInterleave:
        order = FileInterleave(self.source, self.files, self.seed, epoch, shuffle=self.shuffle_buffer > 0)
        if position is not None:
            order.load_state_dict(position)
        return order

    def _draw(self) -> dict:
        """A random document out of the buffer (swap with the last, pop: O(1))."""
        j = int(self.rng.integers(len(self.buffer)))
        self.buffer[j], self.buffer[-1] = self.buffer[-1], self.buffer[j]
        ref, text = self.buffer.pop()
        return {"input_ids": tokenize_texts(self.tokenizer, [text])[0], "ref": ref}

    def __iter__(self) -> Iterator[dict]:
        self.order, self._resume_order = self._order(self.epoch, self._resume_order), None
        for ref, payload in self.order:
            g, self.g = self.g, self.g + 1
            if g < self.base or (g - self.base) % self.deal != self.dp_rank:
                continue  # another replica's document
            if ref[:2] in self.quarantine:
                continue  # in a batch that was skipped or rolled back
            doc = document(self.source, ref[0], ref[1], payload)
            if doc is None or (self.only_slice is not None and doc["slice"] != self.only_slice):
                continue  # unusable (counted), or another slice's
            self.buffer.append((ref, doc["text"]))
            if len(self.buffer) > self.shuffle_buffer:
                yield self._draw()
        while self.buffer:  # the epoch's last documents, still in random order
            yield self._draw()

    def state_dict(self) -> dict:
        # Taken between documents: the order has dealt exactly the documents handed out, buffered or skipped.
        return {
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "epoch": self.epoch,
            "g": self.g,
            "base": self.base,
            "deal": self.deal,
            "order": self.order.state_dict() if self.order is not None else self._resume_order,
            "buffer": [list(ref) for ref, _ in self.buffer],
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.g, self.base, self.deal = state["epoch"], state["g"], state["base"], state["deal"]
        self.buffer = self._read_again([tuple(ref) for ref in state["buffer"]])
        self.rng.bit_generator.state = state["rng"]
        self.order, self._resume_order = None, state["order"]

    def load_elastic(self, states: list[dict]) -> None:
        """Continue from the states of another number of replicas (one each, any order). The order
        goes on from the replica furthest ahead; the documents the others had in their buffers, or
        were yet to read before that point, are dealt out in turn to the new replicas' buffers."""
        lead = max(states, key=_position)
        pending = [tuple(ref) for s in sorted(states, key=lambda s: s["dp_rank"]) for ref in s["buffer"]]
        pending += self._not_yet_read(states, lead)
        self.epoch, self.g, self.base, self.deal = lead["epoch"], lead["g"], lead["g"], self.dp_size
        self.buffer = self._read_again(pending[self.dp_rank :: self.dp_size])
        self.rng = np.random.default_rng([self.seed, self.dp_rank, self.stream_id, lead["epoch"], lead["g"]])
        self.order, self._resume_order = None, lead["order"]

    def _not_yet_read(self, states: list[dict], lead: dict) -> list[Ref]:
        """The documents dealt to a replica behind `lead` between its position and the lead's: the
        order read again from the replica furthest behind."""
        behind = {s["dp_rank"]: s for s in states}
        lag = min(states, key=_position)
        if lead["epoch"] > lag["epoch"] + 1:
            raise UsageError(
                "the checkpoint's replicas are more than an epoch apart; resume with its number of replicas"
            )
        found = []
        for epoch in range(lag["epoch"], lead["epoch"] + 1):
            in_epoch = [s for s in states if s["epoch"] == epoch]
            start = lag if epoch == lag["epoch"] else None  # the lead's epoch, begun after the lag's: from its start
            base, deal = in_epoch[0]["base"], in_epoch[0]["deal"]
            g = start["g"] if start else 0
            for ref, _ in self._order(epoch, start["order"] if start else None):
                if (epoch, g) >= _position(lead):
                    break
                owner = behind.get((g - base) % deal) if g >= base else None
                if owner is not None and _position(owner) <= (epoch, g):
                    found.append(ref)
                g += 1
        return found

    def _read_again(self, refs: list[Ref]) -> list[tuple[Ref, str]]:
        texts = read_again(self.source, refs)
        return [(ref, texts[ref]) for ref in refs]


def read_again(source: Source, refs: list[Ref]) -> dict[Ref, str]:
    """The texts of the documents a checkpoint's buffers name; one line if one is gone (the data changed)."""
    texts = read_texts(source, refs)
    for ref in refs:
        if texts[ref] is None:
            raise UsageError(
                f"the data changed since the checkpoint: {source.files[ref[0]]} has no usable record {ref[1]} any "
                "more; restore the data, or pass --reset_data"
            )
    return {ref: document["text"] for ref, document in texts.items()}


def _position(state: dict) -> tuple[int, int]:
    """Where a replica's stream stands: (epoch, documents of the epoch's order dealt so far)."""
    return state["epoch"], state["g"]


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
    if not all(0 <= w < float("inf") for w in weights.values()) or sum(weights.values()) <= 0:  # NaN fails too
        raise UsageError(f"--data_mix {spec!r}: weights must be non-negative and not all zero")
    total = sum(weights.values())
    return {name: w / total for name, w in weights.items() if w > 0}


def mixture_slices(source: Source, weights: dict[str, float]) -> dict[str, tuple[list[str] | None, str | None]]:
    """{slice: (its files, the row-field value to keep)}: slices named by a row field
    (`--slice_field`, e.g. SlimPajama's meta.redpajama_set_name) read all files and keep their own
    documents; otherwise a slice is the files whose names start with it (RedPajama's arxiv_*, ...)."""
    if source.slice_field:
        return {name: (None, name) for name in weights}
    if not source.files:
        raise UsageError(
            f"--data_mix needs slices: {source.name} has no data files we can name by slice; pass --slice_field "
            "with the row field that names them (e.g. meta.redpajama_set_name), or -d with local files"
        )
    groups: dict[str, list[str]] = {}
    for f in source.files:
        groups.setdefault(slice_name(f), []).append(f)
    missing = sorted(set(weights) - set(groups))
    if missing:
        raise UsageError(
            f"--data_mix names slice(s) {', '.join(missing)} that {source.name} does not have "
            f"(it has: {', '.join(sorted(groups))}); or pass --slice_field if its rows name their slice"
        )
    return {name: (groups[name], None) for name in weights}


class MixedDocuments:
    """Documents from several slices, in an order that keeps each slice's share of tokens close to
    its weight: the next document comes from the slice furthest below its target. Deterministic, so
    the mixture is the same on every run and resumes exactly. A slice that runs out starts over.
    It never ends: set the run's length with --max_steps."""

    def __init__(self, slices: dict, weights: dict[str, float]):
        self.slices, self.weights = slices, weights
        any_slice = next(iter(slices.values()))
        self.source, self.tokenizer = any_slice.source, any_slice.tokenizer  # shared by all slices
        self.tokens = dict.fromkeys(slices, 0)
        self.epochs = dict.fromkeys(slices, 0)
        self._iterators: dict[str, Iterator] = {}

    def set_epoch(self, epoch: int) -> None:
        pass  # each slice keeps its own epoch (and file order)

    def set_quarantine(self, quarantine: frozenset[tuple[int, int]]) -> None:
        for ds in self.slices.values():
            ds.set_quarantine(quarantine)

    def _next_from(self, name: str) -> dict:
        empty_passes = 0  # a pass resumed at the very end of an epoch may be empty; two in a row mean no data
        while True:
            if name not in self._iterators:
                self.slices[name].set_epoch(self.epochs[name])
                self._iterators[name] = iter(self.slices[name])
            try:
                return next(self._iterators[name])
            except StopIteration:
                del self._iterators[name]
                self.epochs[name] += 1
                empty_passes += 1
                if empty_passes == 2:
                    raise UsageError(
                        f"--data_mix slice {name!r} has no documents for this data-parallel rank; "
                        "drop it from --data_mix, or check -d and --slice_field"
                    ) from None

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

    def load_elastic(self, states: list[dict]) -> None:
        """Each slice's stream moves on its own; the token counts are the replicas' mean, so the
        shares carry on where the run left them."""
        replicas = len(states)
        self.tokens = {name: sum(s["tokens"][name] for s in states) // replicas for name in self.slices}
        for name, ds in self.slices.items():
            ds.load_elastic([s["slices"][name] for s in states])
            self.epochs[name] = ds.epoch
        self._iterators = {}


# ---------------------------------------------------------------------------------------------
# Packing


Piece = list  # [file, record, offset, first token, end token]: a stretch of one document's tokens


def piece_positions(pieces: list[Piece]) -> np.ndarray:
    """Each token's position within its document (BOS is 0), for a row made of these pieces."""
    return np.concatenate([np.arange(first, end) for *_, first, end in pieces])


class PackedRows:
    """Rows of exactly `seq_len` tokens (with their document positions), cut from the concatenated
    documents, epoch after epoch; with `shuffle_rows`, drawn at random from a buffer of that many
    rows, so that a long document (a book is hundreds of rows) does not fill many batches in a row.

    Every row knows its pieces (which stretch of which document it holds), and so does the
    leftover that waits for the next row: the state is those pieces, not their tokens, and a
    resumed run reads and tokenizes the documents again. The row buffer's generator is part of the
    state, so resuming is exact.

    The quarantine (`add_quarantine`: the documents of a batch the trainer skipped or rolled back) is
    part of the state too: those documents are never dealt again, and rows or leftover tokens that
    hold a stretch of one are dropped, with the stretches of other documents that share those rows."""

    def __init__(self, documents, seq_len: int, eos_id: int, shuffle_rows: int = 0, seed: int = 0, dp_rank: int = 0):
        self.documents = documents
        self.seq_len = seq_len
        self.eos_id = eos_id
        self.leftover: list[int] = []  # tokens waiting for the next row
        self.leftover_pieces: list[Piece] = []  # what they are
        self.epoch = 0
        self._resumed = False
        self.shuffle_rows = shuffle_rows
        self.rows: list[tuple[list[int], list[Piece]]] = []  # the row buffer
        self.seed, self.dp_rank = seed, dp_rank
        self.rng = np.random.default_rng([seed, dp_rank, 1_000_003])  # its draws
        self.quarantine: frozenset[tuple[int, int]] = frozenset()  # (file, record)s never to feed again

    def add_quarantine(self, documents: list[tuple[str, int]]) -> None:
        """Never feed these documents ((file name, record) pairs) again. Call it between rows (not
        while another thread reads ahead)."""
        index = {name: i for i, name in enumerate(self.documents.source.files)}
        found = {(index[name], int(record)) for name, record in documents if name in index}
        self._set_quarantine(self.quarantine | found)

    def _set_quarantine(self, quarantine: frozenset[tuple[int, int]]) -> None:
        self.quarantine = frozenset(quarantine)
        self.documents.set_quarantine(self.quarantine)
        self.rows = [(tokens, pieces) for tokens, pieces in self.rows if not self._touches(pieces)]
        tokens, pieces, at = [], [], 0
        for piece in self.leftover_pieces:
            length = piece[4] - piece[3]
            if not self._touches([piece]):
                tokens += self.leftover[at : at + length]
                pieces.append(piece)
            at += length
        self.leftover, self.leftover_pieces = tokens, pieces

    def _touches(self, pieces: list[Piece]) -> bool:
        return any((p[0], p[1]) in self.quarantine for p in pieces)

    def named_quarantine(self) -> list[list]:
        """The quarantine as sorted [file name, record] pairs (what the checkpoint and the export hold)."""
        return [[self.documents.source.files[f], r] for f, r in sorted(self.quarantine)]

    def __iter__(self) -> Iterator[tuple[list[int], np.ndarray, list[Piece]]]:
        for row in self._packed():
            if not self.shuffle_rows:
                yield row[0], piece_positions(row[1]), row[1]
                continue
            self.rows.append(row)
            if len(self.rows) > self.shuffle_rows:
                j = int(self.rng.integers(len(self.rows)))
                self.rows[j], self.rows[-1] = self.rows[-1], self.rows[j]
                tokens, pieces = self.rows.pop()
                yield tokens, piece_positions(pieces), pieces

    def _cut(self) -> tuple[list[int], list[Piece]]:
        """The next row off the leftover, with its pieces."""
        tokens, self.leftover = self.leftover[: self.seq_len], self.leftover[self.seq_len :]
        pieces, need = [], self.seq_len
        while need:
            piece = self.leftover_pieces[0]
            take = min(need, piece[4] - piece[3])
            pieces.append([*piece[:3], piece[3], piece[3] + take])
            need -= take
            if take == piece[4] - piece[3]:
                self.leftover_pieces.pop(0)
            else:
                piece[3] += take
        return tokens, pieces

    def _packed(self) -> Iterator[tuple[list[int], list[Piece]]]:
        while True:
            self.documents.set_epoch(self.epoch)
            # A pass resumed from a checkpoint may start at the very end of an epoch and see nothing.
            resumed, self._resumed = self._resumed, False
            documents_seen = 0
            while len(self.leftover) >= self.seq_len:  # (after an elastic resume, leftovers were pooled)
                yield self._cut()
            for example in self.documents:
                documents_seen += 1
                self.leftover.extend(example["input_ids"])
                self.leftover_pieces.append([*example["ref"], 0, len(example["input_ids"])])
                while len(self.leftover) >= self.seq_len:
                    yield self._cut()
            if documents_seen == 0 and not resumed:
                raise UsageError(
                    "the dataset has no documents for this data-parallel rank; use more data or fewer processes"
                )
            self.epoch += 1

    def state_dict(self) -> dict:
        # Taken between rows: the documents have delivered exactly the tokens that were yielded or
        # wait in the leftover or (packed) in the row buffer.
        return {
            "dp_rank": self.dp_rank,
            "documents": self.documents.state_dict(),
            "leftover": [list(p) for p in self.leftover_pieces],
            "epoch": self.epoch,
            "rows": [[list(p) for p in pieces] for _, pieces in self.rows],
            "rng": self.rng.bit_generator.state,
            "quarantine": self.named_quarantine(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.documents.load_state_dict(state["documents"])
        self._load_pieces(state["leftover"], state["rows"])
        self.epoch = state["epoch"]
        self.rng.bit_generator.state = state["rng"]
        self._resumed = True
        self.quarantine = frozenset()
        self.add_quarantine(state.get("quarantine", []))

    def load_elastic(self, states: list[dict], dp_size: int) -> None:
        """From the states of another number of replicas: the documents' streams move (see
        `DocumentStream.load_elastic`); the leftovers and buffered rows are dealt out in turn."""
        states = sorted(states, key=lambda s: s["dp_rank"])
        if len(states) == dp_size:  # as many replicas (another tp or pp): each goes on from its own
            self.load_state_dict(states[self.dp_rank])
            return
        self.documents.load_elastic([s["documents"] for s in states])
        mine = range(self.dp_rank, len(states), dp_size)
        leftover = [p for i in mine for p in states[i]["leftover"]]
        rows = [r for s in states for r in s["rows"]][self.dp_rank :: dp_size]
        self._load_pieces(leftover, rows)
        self.epoch = max(s["epoch"] for s in states)  # the replica furthest ahead's
        self.rng = np.random.default_rng([self.seed, self.dp_rank, 1_000_003, self.epoch, len(states)])
        self._resumed = True
        self.quarantine = frozenset()
        self.add_quarantine([pair for s in states for pair in s.get("quarantine", [])])

    def _load_pieces(self, leftover: list[Piece], rows: list[list[Piece]]) -> None:
        """The tokens of the leftover and the buffered rows, from their documents read again."""
        refs = {tuple(p[:3]) for p in leftover} | {tuple(p[:3]) for pieces in rows for p in pieces}
        texts = read_again(self.documents.source, sorted(refs))
        tokens = {ref: tokenize_texts(self.documents.tokenizer, [text])[0] for ref, text in texts.items()}

        def cut(pieces):
            return [t for p in pieces for t in tokens[tuple(p[:3])][p[3] : p[4]]]

        self.leftover, self.leftover_pieces = cut(leftover), [list(p) for p in leftover]
        self.rows = [(cut(pieces), [list(p) for p in pieces]) for pieces in rows]


def rows_to_batch(rows: list[tuple]) -> dict[str, torch.Tensor]:
    """Packed rows (tokens, document positions, ...) as model inputs. Labels equal the inputs: the model shifts them."""
    input_ids = torch.tensor([row[0] for row in rows], dtype=torch.long)
    position_ids = torch.from_numpy(np.stack([row[1] for row in rows])).long()
    return {"input_ids": input_ids, "labels": input_ids.clone(), "position_ids": position_ids}


class PretrainBatches:
    """Batches of packed rows as model inputs. Labels equal the inputs: the model shifts them.

    `provenance` says where the last batch came from, for the data ledger: its documents as
    (file name, record) pairs, in the order their first tokens appear in the batch."""

    def __init__(self, rows: PackedRows, batch_size: int):
        self.rows = rows
        self.batch_size = batch_size
        self._iterator = iter(rows)
        self.provenance: dict = {}

    def next_batch(self) -> dict[str, torch.Tensor]:
        rows = [next(self._iterator) for _ in range(self.batch_size)]
        files = self.rows.documents.source.files
        documents = dict.fromkeys((files[p[0]], p[1]) for row in rows for p in row[2])  # (ordered, each once)
        self.provenance = {"documents": [list(d) for d in documents]}
        return rows_to_batch(rows)

    def add_quarantine(self, documents: list[tuple[str, int]]) -> None:
        """Never feed these documents again (see `PackedRows.add_quarantine`)."""
        self.rows.add_quarantine(documents)

    @property
    def epoch(self) -> int:
        return self.rows.epoch

    def state_dict(self) -> dict:
        return self.rows.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.rows.load_state_dict(state)
        self._iterator = iter(self.rows)

    def load_elastic(self, states: list[dict], dp_size: int) -> None:
        """Continue a stream saved by another number of replicas (`states`: one per old replica)."""
        self.rows.load_elastic(states, dp_size)
        self._iterator = iter(self.rows)


def held_out_text_batches(
    source: Source, tokenizer, seq_len: int, batch_size: int, dp_rank: int, dp_size: int, max_tokens: int
) -> tuple[list[dict], int]:
    """A fixed held-out set for pretraining: the first rows of `seq_len` tokens packed from
    `source`'s documents in their own order, at most `max_tokens` in all (fewer if it holds fewer),
    in whole batches of `batch_size` per replica; this replica's batches and the total tokens."""
    per_step = batch_size * dp_size
    wanted = max(1, math.ceil(max_tokens / (seq_len * per_step))) * per_step
    packed = PackedRows(DocumentStream(source, tokenizer, 0, 1), seq_len, tokenizer.eos_token_id)
    rows = []
    for row in packed:
        if packed.epoch > 0 or len(rows) == wanted:  # one pass over the text, no repeats
            break
        rows.append(row)
    rows = rows[: len(rows) // per_step * per_step]
    if not rows:
        raise UsageError(
            f"--eval_data {source.name} holds fewer than {seq_len * per_step} tokens, not one batch for each of the "
            f"{dp_size} replicas; pass more held-out text or a smaller -b/-l"
        )
    mine = rows[dp_rank::dp_size]
    return [rows_to_batch(mine[i : i + batch_size]) for i in range(0, len(mine), batch_size)], len(rows) * seq_len


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
        self._first: tuple | None = None  # the next item, read by `start` or taken from the queue
        self.provenance: dict = {}  # the last batch's (see PretrainBatches)

    def _read(self) -> tuple:
        """(the next batch, where it came from, the source's state and epoch after it, None), or the
        error reading it raised in the last place (e.g. an empty dataset), for the trainer to raise."""
        try:
            batch = self.source.next_batch()
            provenance = getattr(self.source, "provenance", {})
            return batch, provenance, self.source.state_dict(), self.source.epoch, None
        except BaseException as e:
            return None, None, None, None, e

    def _produce(self, out: queue.Queue, stop: threading.Event) -> None:
        while not stop.is_set():
            item = self._read()
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[4] is not None:
                return

    def _read_ahead(self) -> None:
        if self._queue is None:
            self._queue, self._stop = queue.Queue(maxsize=self.depth), threading.Event()
            self._thread = threading.Thread(target=self._produce, args=(self._queue, self._stop), daemon=True)
            self._thread.start()

    def start(self) -> None:
        """Read the first batch now: data that cannot give one (no documents for this rank) is
        refused here, before the run writes anything. It is read on this thread, and reading ahead
        starts only at the first next_batch: a thread making tensors while the model is built would
        make ColossalAI's lazy ones (LazyInitContext patches torch's constructors process-wide)."""
        if self._first is None and self._queue is None:
            self._first = self._read()
        if self._first is not None and self._first[4] is not None:
            raise self._first[4]

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self._first is None:
            self._read_ahead()
            self._first = self._queue.get()
        (batch, provenance, state, epoch, error), self._first = self._first, None
        if error is not None:
            raise error
        self._read_ahead()  # the model exists now: prepare the next batches while it trains on this one
        self._state, self._epoch, self.provenance = state, epoch, provenance
        return batch

    def add_quarantine(self, documents: list[tuple[str, int]]) -> None:
        """Never feed these documents again: the batches read ahead are dropped, the source goes back
        to just after the last batch the trainer took and drops what it holds of them."""
        if not hasattr(self.source, "add_quarantine"):
            return  # prepared or synthetic data: no documents to leave out
        self.load_state_dict(self._state)
        self.source.add_quarantine(documents)
        self._state = self.source.state_dict()

    @property
    def epoch(self) -> int:
        return self._epoch

    def state_dict(self) -> dict:
        return self._state

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.source.load_state_dict(state)
        self._state, self._epoch = self.source.state_dict(), self.source.epoch

    def load_elastic(self, states: list[dict], dp_size: int) -> None:
        self.close()
        self.source.load_elastic(states, dp_size)
        self._state, self._epoch = self.source.state_dict(), self.source.epoch

    def close(self) -> None:
        """Stop reading ahead. Batches already prepared are dropped; the source is left wherever
        the thread stopped, so only load_state_dict() should follow."""
        if self._stop is not None:
            self._stop.set()
            self._thread.join(timeout=30)  # let it finish the batch in hand before the process moves on
        self._queue, self._stop, self._thread, self._first = None, None, None, None


# ---------------------------------------------------------------------------------------------
# Entry points


def mixture_tokens(batches) -> dict[str, int] | None:
    """Tokens drawn from each slice so far, where the batches come from a --data_mix mixture."""
    documents = batches.state_dict().get("documents")
    return dict(documents["tokens"]) if isinstance(documents, dict) and "slices" in documents else None


def build_pretrain_batches(
    dataset: Source | str,
    tokenizer,
    seq_len: int,
    batch_size: int,
    dp_rank: int,
    dp_size: int,
    data_mix: str | None = None,
    seed: int = 0,
    shuffle_buffer: int = 0,
    shuffle_rows: int | None = None,
) -> PretrainBatches:
    """Packed batches from a stream (or a weighted mixture of its slices, each shuffled on its own)
    for one replica; `shuffle_buffer=0` reads the files in their own order; `shuffle_rows`: the row
    buffer (None: as many rows as `shuffle_buffer` documents)."""
    source = resolve_source(dataset) if isinstance(dataset, str) else dataset
    shuffled = dict(seed=seed, shuffle_buffer=shuffle_buffer)
    if data_mix:
        weights = parse_data_mix(data_mix)
        slices = {
            name: DocumentStream(source, tokenizer, dp_rank, dp_size, files, stream_id=i, only_slice=only, **shuffled)
            for i, (name, (files, only)) in enumerate(mixture_slices(source, weights).items())
        }
        documents = MixedDocuments(slices, weights)
    else:
        documents = DocumentStream(source, tokenizer, dp_rank, dp_size, **shuffled)
    rows_buffer = shuffle_buffer if shuffle_rows is None else shuffle_rows
    rows = PackedRows(documents, seq_len, tokenizer.eos_token_id, rows_buffer, seed, dp_rank)
    return PretrainBatches(rows, batch_size)


def count_tokens(dataset: Source | str, tokenizer, dp_rank: int, dp_size: int, progress: bool) -> int:
    """Tokens (with BOS/EOS) in this replica's share of one epoch; sizes the LR schedule."""
    documents = DocumentStream(dataset, tokenizer, dp_rank, dp_size)  # one epoch, in the files' own order
    total = 0
    for example in tqdm(documents, desc="counting tokens to size the LR schedule", unit=" docs", disable=not progress):
        total += len(example["input_ids"])
    SKIPPED.clear()  # training reads the same lines again and reports them then
    return total
