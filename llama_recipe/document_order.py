"""Which document comes next: the records of a stream's files, interleaved, addressed by (file, record).

A corpus's files are often one slice or one crawl each, and far larger than any shuffle buffer
(RedPajama's sample: a few GB per file; SlimPajama: 59,000 chunks; FineWeb: one crawl per file).
Reading them one after another, a buffer can only mix what it holds: training would walk the corpus
file by file. So an epoch reads many files at once (`OPEN_FILES` of them, in an order drawn from the
seed and the epoch, the next one opening when one ends) and takes each next document from an open
file drawn at random, weighted by the documents it has left (estimated from its remaining bytes and
its mean bytes per document so far; a Parquet file's row count is exact). Every stretch of the epoch
then holds each open file in proportion to what it holds, as a uniformly random order would.

The order is the same on every replica (nothing in it depends on the number of replicas); `data.py`
deals its documents out. A document is addressed by `Ref` (file, record, byte offset), so a position
in the epoch is a few numbers per open file, and a buffered document can be read again on resume
(`read_texts`) instead of being saved as text.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .sources import JsonlRecords, Source, open_binary, parse_jsonl_line, parse_row

OPEN_FILES = 16  # files read at once per stream: enough to mix slices, few enough connections per rank on the hub

Ref = tuple[int, int, int]  # (index into the source's files, record number in that file, its byte offset)


class ParquetRecords:
    """The rows of a Parquet file, from row `record` (its row groups are read one at a time)."""

    def __init__(self, file: str, columns: list[str], record: int = 0):
        import pyarrow.parquet as pq

        self.file = file
        self.raw, _ = open_binary(file)
        self.parquet = pq.ParquetFile(self.raw)
        self.columns = [c for c in columns if c in self.parquet.schema_arrow.names]
        self.size = self.parquet.metadata.num_rows
        self.record = record
        self._group, self._rows, self._first = -1, [], 0

    def _rows_at(self, record: int) -> tuple[list[dict], int]:
        """The rows of the row group holding `record`, and its first record number."""
        if self._group >= 0 and self._first <= record < self._first + len(self._rows):
            return self._rows, self._first
        first = 0
        for group in range(self.parquet.num_row_groups):
            n = self.parquet.metadata.row_group(group).num_rows
            if record < first + n:
                if group != self._group:
                    self._group, self._first = group, first
                    self._rows = self.parquet.read_row_group(group, columns=self.columns).to_pylist()
                return self._rows, self._first
            first += n
        return [], first

    def next(self) -> tuple[int, int, dict] | None:
        rows, first = self._rows_at(self.record)
        if not rows:
            return None
        self.record += 1
        return self.record - 1, 0, rows[self.record - 1 - first]

    def remaining(self) -> tuple[float, float]:
        return float(self.size - self.record), 1.0

    def close(self) -> None:
        self.raw.close()


def open_records(source: Source, file: int, record: int = 0, offset: int = 0):
    name = source.files[file]
    if name.endswith(".parquet"):
        top = [source.text_field.split(".")[0], *([source.slice_field.split(".")[0]] if source.slice_field else [])]
        return ParquetRecords(name, top, record)
    return JsonlRecords(name, record, offset)


def document(source: Source, file: int, record: int, payload) -> dict | None:
    """A record as {"text", "slice"}, or None when it is unusable (skipped and counted)."""
    if isinstance(payload, bytes):
        return parse_jsonl_line(payload, source.files[file], record + 1, source)
    return parse_row(payload, source)


class FileInterleave:
    """One epoch's documents of `files` (indices into the source's files), in an order drawn from
    (seed, epoch): the same on every replica. With `shuffle` off: the files one after another, in
    their own order. Iterating yields (Ref, raw record); `state_dict()` between two records is the
    position: each open file's (file, record, offset), the next file to open, the generator."""

    def __init__(self, source: Source, files: list[int], seed: int, epoch: int, shuffle: bool = True):
        self.source = source
        order = np.random.default_rng([seed, epoch, 7]).permutation(len(files)) if shuffle else range(len(files))
        self.files = [files[i] for i in order]
        self.max_open = OPEN_FILES if shuffle else 1
        self.rng = np.random.default_rng([seed, epoch, 11])
        self.next_file = 0
        self.open: list[tuple[int, object]] = []  # (file index, its reader)

    def _fill(self) -> None:
        while len(self.open) < self.max_open and self.next_file < len(self.files):
            file = self.files[self.next_file]
            self.open.append((file, open_records(self.source, file)))
            self.next_file += 1

    def _pick(self) -> int:
        """An open file drawn with probability proportional to its estimated records left."""
        if len(self.open) == 1:
            return 0
        left = [reader.remaining() for _, reader in self.open]
        known = [per for _, per in left if per > 0]
        typical = sum(known) / len(known) if known else 1.0  # a file not read yet: the others' mean
        weights = [bytes_left / (per or typical) + 1.0 for bytes_left, per in left]  # +1: until its end shows
        point = self.rng.random() * sum(weights)  # (plain Python: numpy's overhead dominates for a few files)
        for i, weight in enumerate(weights):
            point -= weight
            if point < 0:
                return i
        return len(weights) - 1

    def __iter__(self) -> Iterator[tuple[Ref, object]]:
        while True:
            self._fill()
            if not self.open:
                return
            i = self._pick()
            file, reader = self.open[i]
            item = reader.next()
            if item is None:
                reader.close()
                del self.open[i]
                continue
            record, offset, payload = item
            yield (file, record, offset), payload

    def state_dict(self) -> dict:
        return {
            "next_file": self.next_file,
            "open": [[file, reader.record, getattr(reader, "offset", 0)] for file, reader in self.open],
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.next_file = state["next_file"]
        self.open = [(file, open_records(self.source, file, record, offset)) for file, record, offset in state["open"]]
        self.rng.bit_generator.state = state["rng"]

    def close(self) -> None:
        for _, reader in self.open:
            reader.close()
        self.open = []


def read_texts(source: Source, refs: list[Ref]) -> dict[Ref, dict | None]:
    """The documents at `refs`, read again (for a resumed buffer): each file once, from its first
    wanted record on (buffered documents were read recently, so they lie close together)."""
    found: dict[Ref, dict | None] = {}
    by_file: dict[int, list[Ref]] = {}
    for ref in sorted(set(refs)):  # (a document can be buffered twice: in two replicas' different epochs)
        by_file.setdefault(ref[0], []).append(ref)
    for file, wanted in sorted(by_file.items()):
        reader = open_records(source, file, wanted[0][1], wanted[0][2])
        for ref in wanted:
            item = reader.next()
            while item is not None and item[0] < ref[1]:
                item = reader.next()
            found[ref] = document(source, file, ref[1], item[2]) if item and item[0] == ref[1] else None
        reader.close()
    return found
