"""What `-d` names, resolved to data files and the way to read them.

    -d data/redpajama-sample                          local: a file, a directory (recursive) or a glob
    -d togethercomputer/RedPajama-Data-1T-Sample      a hub dataset: its data files, streamed over hf://
    -d HuggingFaceFW/fineweb-edu --data_config sample-10BT
    -d allenai/c4 --data_dir en

A hub dataset is read through its data files whenever it has any, not through its own builder:
that is what lets the files be reordered every epoch, and what opens repositories built around a
loading script (which `datasets` 4 and later refuse to run). `KNOWN_CORPORA` holds the layouts of
the corpora users pick today (checked against their public file listings; docs/data.md); any other
repository is read through all its data files outside validation/test folders, or through
`--data_dir`, or, when it has none, through its own builder.

JSON lines (plain, .gz or .zst, local or on the hub) go through our own tolerant reader; Parquet
through `datasets`' builder. Both hand out rows of {"text", "slice"}: the slice is the value of a row
field (`--slice_field`, e.g. SlimPajama's meta.redpajama_set_name) when there is one, for mixtures
within one stream.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import glob
import importlib
import json
import os
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .config import SYNTHETIC, DataConfig
from .errors import UsageError

DATA_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst", ".parquet")
PREPARED_META = "meta.json"  # the file that marks a directory written by scripts/prepare_data.py (prepared.py)
HELD_OUT_PARTS = ("validation", "valid", "test", "eval", "holdout", "dev")  # not training data, by name
MAX_WARNINGS = 5  # per process; the rest are only counted
HUB_ATTEMPTS, HUB_BACKOFF_S = 4, 1.0  # transient hub errors: 4 tries, 1 s, 2 s, 4 s apart
TRANSIENT_STATUS = {429, 500, 502, 503, 504}

# meta.redpajama_set_name (SlimPajama, SlimPajama-6B) -> the slice names --data_mix uses
REDPAJAMA_SET_NAMES = {
    "RedPajamaCommonCrawl": "cc",
    "RedPajamaC4": "c4",
    "RedPajamaGithub": "github",
    "RedPajamaBook": "book",
    "RedPajamaArXiv": "arxiv",
    "RedPajamaWikipedia": "wikipedia",
    "RedPajamaStackExchange": "stackexchange",
}


@dataclass(frozen=True)
class Corpus:
    """Where a known hub corpus keeps its training files, and what its rows hold."""

    files: str  # glob of the training files, relative to the repository's root
    configs: dict[str, str] = field(default_factory=dict)  # --data_config -> glob
    slice_field: str | None = None  # the row field naming each document's slice (None: the file name does)
    slice_names: dict[str, str] = field(default_factory=dict)  # that field's values -> slice names
    layout: str = ""  # for docs/data.md


_FINEWEB = dict(
    files="data/*/*.parquet",
    configs={
        **{f"sample-{n}BT": f"sample/{n}BT/*.parquet" for n in (10, 100, 350)},
        "default": "data/*/*.parquet",
    },
    layout="parquet: sample/10BT/000_00000.parquet ..., data/CC-MAIN-2024-10/*.parquet; columns text, id, dump, url, ...",
)
KNOWN_CORPORA: dict[str, Corpus] = {
    "togethercomputer/RedPajama-Data-1T-Sample": Corpus(
        files="*_sample.jsonl",
        layout="11 JSON-lines files at the root (arxiv_sample.jsonl, cc_2023-06_sample.jsonl, ...) next to a "
        "loading script; meta differs per slice (none for cc), so the slice comes from the file name",
    ),
    "cerebras/SlimPajama-627B": Corpus(
        files="train/chunk*/*.jsonl.zst",
        slice_field="meta.redpajama_set_name",
        slice_names=REDPAJAMA_SET_NAMES,
        layout="train/chunk1..10/example_train_N.jsonl.zst (validation/, test/ held out); "
        "rows {text, meta: {redpajama_set_name}}",
    ),
    "DKYoon/SlimPajama-6B": Corpus(
        files="data/train-*.parquet",
        slice_field="meta.redpajama_set_name",
        slice_names=REDPAJAMA_SET_NAMES,
        layout="data/train-*.parquet (validation-*, test-* held out); columns text, meta.redpajama_set_name",
    ),
    "HuggingFaceFW/fineweb": Corpus(**_FINEWEB),
    "HuggingFaceFW/fineweb-edu": Corpus(**_FINEWEB),
    "allenai/c4": Corpus(
        files="en/c4-train.*.json.gz",
        configs={name: f"{name}/c4-train.*.json.gz" for name in ("en", "en.noblocklist", "en.noclean", "realnewslike")},
        layout="en/c4-train.00000-of-01024.json.gz ... (en.noblocklist/, en.noclean/, realnewslike/ alike); "
        "fields text, timestamp, url",
    ),
}


@dataclass(frozen=True)
class Source:
    """What a run reads: data files (local paths or hf:// URLs), or None to use the hub
    repository's own builder; the column holding the text; the row field naming a document's slice."""

    name: str  # what -d said
    files: tuple[str, ...] | None
    text_field: str = "text"
    slice_field: str | None = None
    slice_names: dict[str, str] = field(default_factory=dict)
    data_config: str | None = None  # for the repository's own builder


# ---------------------------------------------------------------------------------------------
# What -d names


def is_prepared_dataset(path: str) -> bool:
    """Whether `path` is a directory written by `prepare_dataset` (it holds meta.json)."""
    return os.path.isfile(os.path.join(path, PREPARED_META))


def looks_like_a_path(name: str) -> bool:
    """Whether `name` reads as a local path rather than a Hugging Face hub id (`owner/name`): it
    starts with `.`, `/` or `~`, its first folder exists here (`data/redpajama-sampel`), or it is no
    valid repository id (`a/b/c`). Such a name that does not exist is refused at once, never looked
    up on the hub (which offline answers "could not reach", after retries)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name.startswith((".", "/", "~")) or ("/" in name and Path(name.split("/")[0]).is_dir()):
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def missing_path(path: str, flag: str) -> str:
    """What to say of a local path that does not exist: that first (with the nearest name beside it,
    for a typo), and only then that it was not taken for a hub name either."""
    p = Path(path).expanduser()
    near = difflib.get_close_matches(p.name, os.listdir(p.parent), n=1) if p.parent.is_dir() else []
    guess = f" (did you mean {p.parent / near[0]}?)" if near else ""
    return f"{flag} {path} does not exist{guess}; it reads as a local path, so it is not a Hugging Face hub name either"


def looks_local(dataset: str) -> bool:
    """Whether `-d` names local files (a path, a glob or a data file name) rather than a hub dataset."""
    return (
        os.path.exists(dataset)
        or any(ch in dataset for ch in "*?[")
        or dataset.endswith(DATA_SUFFIXES)
        or looks_like_a_path(dataset)
    )


def dataset_kind(dataset: str) -> str:
    """What `-d` names: "synthetic", "prepared" (a prepare_data.py output), "local" files or a "hub" dataset."""
    if dataset == SYNTHETIC:
        return "synthetic"
    if is_prepared_dataset(dataset):
        return "prepared"
    return "local" if looks_local(dataset) else "hub"


def _one_kind(dataset: str, files: list[str]) -> list[str]:
    kinds = {"parquet" if f.endswith(".parquet") else "json" for f in files}
    if len(kinds) > 1:
        raise UsageError(f"dataset {dataset!r} mixes Parquet and JSON files; point -d (or --data_dir) at one kind")
    return files


def resolve_local_files(dataset: str, data_dir: str | None = None) -> list[str]:
    """The data files a local `-d` names: a file, a directory (searched recursively, or only its
    `data_dir`) or a glob."""
    path = Path(dataset).expanduser() / (data_dir or "")
    if not any(ch in dataset for ch in "*?[") and not Path(dataset).expanduser().exists():
        raise UsageError(missing_path(dataset, "-d") + "; pass -d with a data file, a directory of them, or a glob")
    if path.is_file():
        files = [str(path)]
    elif path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.name.endswith(DATA_SUFFIXES))
    else:
        files = sorted(f for f in glob.glob(str(path), recursive=True) if f.endswith(DATA_SUFFIXES))
    if not files:
        raise UsageError(
            f"dataset {dataset!r}{f' (--data_dir {data_dir})' if data_dir else ''} matches no .jsonl, .jsonl.gz, "
            ".jsonl.zst, .json or .parquet files; pass -d with a data file, a directory of them, or a glob"
        )
    return _one_kind(dataset, files)


def select_data_files(repo: str, paths: list[str], data_dir: str | None, data_config: str | None) -> list[str]:
    """The training files among a repository's `paths` (relative to its root): the known corpus's
    layout (and `--data_config`), else the files under `--data_dir`, else every data file outside
    held-out folders. The same selection serves the hub and local copies of a hub layout."""
    corpus = KNOWN_CORPORA.get(repo)
    if corpus and data_config and data_config not in corpus.configs:
        raise UsageError(
            f"--data_config {data_config!r} is not one of {repo}'s: {', '.join(corpus.configs)}; pass one of them"
        )
    pattern = corpus.configs.get(data_config, corpus.files) if corpus else None
    if data_dir:
        pattern = f"{data_dir.strip('/')}/*"
    data = sorted(p for p in paths if p.endswith(DATA_SUFFIXES))
    if pattern:
        return [p for p in data if fnmatch.fnmatch(p, pattern)]
    return [
        p for p in data if not any(part in HELD_OUT_PARTS or part.startswith(HELD_OUT_PARTS) for part in p.split("/"))
    ]


def _hub_error(repo: str, error: Exception) -> UsageError:
    """One line for what the hub said (never the token: huggingface_hub's messages hold URLs, not headers)."""
    from huggingface_hub.errors import GatedRepoError, OfflineModeIsEnabled, RepositoryNotFoundError

    local = "pass -d with local JSONL/Parquet files, e.g. -d data/redpajama-sample"
    if isinstance(error, GatedRepoError):
        return UsageError(f"{repo} is a gated dataset: accept its terms on huggingface.co and set HF_TOKEN, or {local}")
    if isinstance(error, RepositoryNotFoundError):
        return UsageError(
            f"no dataset {repo!r} on the Hugging Face hub (or it is private: set HF_TOKEN); check -d, or {local}"
        )
    if isinstance(error, OfflineModeIsEnabled):
        return UsageError(f"-d {repo} is on the Hugging Face hub, but HF_HUB_OFFLINE is set; {local}")
    detail = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
    return UsageError(
        f"could not reach the Hugging Face hub for {repo!r} ({type(error).__name__}: {detail}); "
        f"if this machine is offline, {local}"
    )


def _transient(error: Exception) -> bool:
    """Worth another try: a timeout, or a 429, 500, 502, 503 or 504 answer. Refused or unresolvable connections are not
    (an offline machine would wait for nothing)."""
    import requests
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, requests.Timeout):
        return True
    status = getattr(getattr(error, "response", None), "status_code", None)
    return isinstance(error, HfHubHTTPError) and status in TRANSIENT_STATUS


# Not huggingface_hub's http_backoff: it wraps one request, not an HfApi call, and retries refused connections too.
def with_hub_retries(call: Callable, repo: str):
    """`call()`, tried again after transient hub errors (1 s, 2 s, 4 s, ...); then one line.
    (HUB_ATTEMPTS and HUB_BACKOFF_S are read at each call, so a test can shorten the waits.)"""
    import requests
    from huggingface_hub.errors import OfflineModeIsEnabled

    for attempt in range(HUB_ATTEMPTS):
        try:
            return call()
        except (requests.RequestException, OfflineModeIsEnabled) as e:  # HfHubHTTPError is a requests.HTTPError
            if attempt + 1 == HUB_ATTEMPTS or not _transient(e):
                raise _hub_error(repo, e) from None
            time.sleep(HUB_BACKOFF_S * 2**attempt)
    raise AssertionError("unreachable")


@functools.lru_cache(maxsize=16)  # one listing per repository per process
def list_hub_files(repo: str) -> list[str]:
    """The files of a hub dataset repository (HF_TOKEN from the environment, for gated sets)."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)  # read now, so a test's endpoint applies
    return with_hub_retries(lambda: api.list_repo_files(repo, repo_type="dataset"), repo)


def hub_file_url(repo: str, path: str) -> str:
    return f"hf://datasets/{repo}/{path}"


def resolve_source(
    dataset: str,
    data_dir: str | None = None,
    data_config: str | None = None,
    text_field: str = "text",
    slice_field: str | None = None,
    list_files: Callable[[str], list[str]] = list_hub_files,
    file_url: Callable[[str, str], str] = hub_file_url,
) -> Source:
    """What a run reads for `-d`. For a hub dataset this lists its files (one listing, retried whole);
    `list_files` and `file_url` are where a repository's files are listed and read from (the hub,
    or a local copy laid out as the repository is)."""
    corpus = KNOWN_CORPORA.get(dataset)
    slices = dict(
        slice_field=slice_field or (corpus.slice_field if corpus else None),
        slice_names=corpus.slice_names if corpus else REDPAJAMA_SET_NAMES,
    )
    if dataset_kind(dataset) == "local":
        files = resolve_local_files(dataset, data_dir)
        return Source(dataset, tuple(files), text_field, **slices)
    selected = select_data_files(dataset, list_files(dataset), data_dir, data_config)
    if not selected and (corpus or data_dir):
        raise UsageError(
            f"{dataset} has no data files matching {'--data_dir ' + data_dir if data_dir else 'its known layout'}; "
            "check --data_dir/--data_config"
        )
    files = tuple(file_url(dataset, p) for p in _one_kind(dataset, selected)) if selected else None
    return Source(dataset, files, text_field, data_config=data_config, **slices)


def check_text_field(source: Source) -> None:
    """For local files: the first file has the text column (Parquet: its schema; plain JSON lines: its
    first row), so a wrong --text_field fails before training instead of at the first batch. Compressed
    JSON lines are checked as they are read (a row without the field is skipped and counted)."""
    if not source.files or not Path(source.files[0]).is_file():
        return  # a hub dataset's files are checked when read
    first = source.files[0]
    if first.endswith((".jsonl", ".json")):
        with open(first, "rb") as f:
            line = next((raw for raw in f if raw.strip()), b"")
        try:
            row = json.loads(line)
        except ValueError:
            return  # a broken line is skipped and counted when read
        if isinstance(row, dict) and row.get(source.text_field) is None:  # as the readers look it up: one key
            raise UsageError(
                f"{first}'s first row has no field {source.text_field!r} (it has: {', '.join(row) or 'none'}); "
                "pass --text_field with the one holding the text"
            )
    if first.endswith(".parquet"):
        import pyarrow
        import pyarrow.parquet as pq

        try:
            columns = pq.read_schema(first).names
        except (pyarrow.ArrowException, OSError) as e:  # not a Parquet file (ArrowInvalid), truncated, unreadable
            raise UsageError(f"{first} is not a readable Parquet file ({type(e).__name__}); fix or remove it") from None
        if source.text_field not in columns:
            raise UsageError(
                f"{first} has no column {source.text_field!r} (it has: {', '.join(columns)}); "
                "pass --text_field with the one holding the text"
            )


def source_for(data: DataConfig) -> Source:
    """The Source of a run's data flags (-d, --data_dir, --data_config, --text_field, --slice_field)."""
    source = resolve_source(data.dataset, data.data_dir, data.data_config, data.text_field, data.slice_field)
    check_text_field(source)
    return source


def check_dataset_source(dataset: str, data_dir: str | None = None) -> None:
    """Fail early on a local dataset path that holds no data (hub names are checked by resolve_source)."""
    if dataset_kind(dataset) == "local":
        resolve_local_files(dataset, data_dir)


# ---------------------------------------------------------------------------------------------
# Reading rows


SKIPPED: dict[str, int] = {}  # reason -> count, in this process


def skip_line(file: str, line: int, reason: str) -> None:
    """Count an unusable line and warn about the first few (returns None: the line's document)."""
    SKIPPED[reason] = SKIPPED.get(reason, 0) + 1
    if sum(SKIPPED.values()) <= MAX_WARNINGS:
        rank = os.environ.get("RANK", "0")
        sys.stderr.write(f"warning (rank {rank}): {file} line {line}: {reason}; skipped\n")


def field_value(row: dict, dotted: str):
    """row["meta"]["redpajama_set_name"] for "meta.redpajama_set_name" (None where missing)."""
    for key in dotted.split("."):
        if isinstance(row, str) and row.startswith("{"):  # meta stored as a JSON string
            try:
                row = json.loads(row)
            except json.JSONDecodeError:
                return None
        row = row.get(key) if isinstance(row, dict) else None
    return row


def slice_of(row: dict, slice_field: str | None, slice_names: dict[str, str]) -> str:
    """A row's slice name ("" when the stream has no slice field)."""
    if not slice_field:
        return ""
    value = field_value(row, slice_field)
    return slice_names.get(value, str(value).lower()) if value is not None else ""


@functools.cache
def damaged_file_errors() -> tuple[type[Exception], ...]:
    """What reading a damaged or cut-short file raises: gzip's EOFError, BadGzipFile (an OSError) and
    zlib.error; the ZstdError of the module fsspec decompresses .zst with (zstandard, pinned, unless
    backports.zstd or Python 3.14's compression.zstd is there); OSError for a dropped hf:// connection."""
    errors = [EOFError, OSError, zlib.error]
    for name in ("compression.zstd", "backports.zstd", "zstandard"):
        try:
            errors.append(importlib.import_module(name).ZstdError)
        except ImportError:
            pass
    return tuple(errors)


BLOCK = 1 << 18  # bytes read at a time from a (decompressed) JSON-lines file


def open_binary(file: str):
    """The file's raw bytes (fsspec: local paths and hf:// URLs alike) and their size."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(file)
    return fs.open(path, "rb"), fs.size(path)


class JsonlRecords:
    """The non-blank lines of a JSON-lines file (plain, .gz or .zst), from record `record`.

    Progress (for the interleave's weights) is counted in raw bytes: the decompressed offset for a
    plain file, the compressed position after each block for a compressed one. A compressed file
    resumes by reading again from its start with the same blocks, so its progress figures are the
    same as the uninterrupted run's; a plain one seeks to the record's offset.
    """

    def __init__(self, file: str, record: int = 0, offset: int = 0):
        import fsspec

        self.file = file
        self.raw, self.size = open_binary(file)
        codec = fsspec.core.get_compression(file, "infer")
        self.stream = fsspec.compression.compr[codec](self.raw, mode="rb") if codec else self.raw
        self.compressed = codec is not None
        self.record, self.offset, self.progress = 0, 0, 0
        self._buffer, self._start, self._done = b"", 0, False
        if not self.compressed and offset:
            self.raw.seek(offset)
            self.record, self.offset, self.progress = record, offset, offset
        while self.record < record and self.next() is not None:
            pass  # a compressed file: decompress up to the record

    def _fill(self) -> bool:
        try:
            chunk = self.stream.read(BLOCK)
        except damaged_file_errors() as e:
            skip_line(
                self.file, self.record + 1, f"the file is damaged or cut short here ({type(e).__name__}); the rest"
            )
            chunk = b""
        if self.compressed:
            self.progress = self.raw.tell()
        self._buffer, self._start = self._buffer[self._start :] + chunk, 0
        return bool(chunk)

    def next(self) -> tuple[int, int, bytes] | None:
        """(record number, byte offset, the line) of the next non-blank line; None at the end."""
        while True:
            end = self._buffer.find(b"\n", self._start)
            if end < 0 and not self._done:
                self._done = not self._fill()
                continue
            if end < 0:
                end = len(self._buffer)
                if end == self._start:
                    return None
            line, offset = self._buffer[self._start : end], self.offset
            self._start, self.offset = end + 1, self.offset + end + 1 - self._start
            if not self.compressed:
                self.progress = self.offset
            if line.strip():
                self.record += 1
                return self.record - 1, offset, line

    def remaining(self) -> tuple[float, float]:
        """(raw bytes left, raw bytes per record so far; 0 when none read yet)."""
        return max(self.size - self.progress, 0), (self.progress / self.record if self.record else 0.0)

    def close(self) -> None:
        self.stream.close()
        self.raw.close()


def parse_jsonl_line(raw: bytes, file: str, number: int, source: Source) -> dict | None:
    """A JSON line as {"text", "slice"}, or None, skipped and counted, when it is not a valid UTF-8
    JSON object with a non-empty string text: one bad line in a terabyte must not stop a run."""
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return skip_line(file, number, "not valid UTF-8")
    except json.JSONDecodeError:
        return skip_line(file, number, "not valid JSON")
    text = row.get(source.text_field) if isinstance(row, dict) else None
    if not isinstance(text, str):
        return skip_line(file, number, f"no {source.text_field} field")
    if not text.strip():
        return skip_line(file, number, "empty text")
    return {"text": text, "slice": slice_of(row, source.slice_field, source.slice_names)}


def parse_row(row: dict, source: Source) -> dict | None:
    """A Parquet row as {"text", "slice"}, or None (counted) when its text is missing or empty."""
    text = field_value(row, source.text_field)
    if not _usable({"text": text}):
        return None
    return {"text": text, "slice": slice_of(row, source.slice_field, source.slice_names)}


def read_jsonl_documents(
    files: list[str], text_field: str = "text", slice_field: str | None = None, slice_names: dict | None = None
) -> Iterator[dict]:
    """Rows {"text", "slice"} of JSON-lines files: local or hf:// URLs, plain, .gz or .zst; unusable
    lines skipped and counted."""
    source = Source("", None, text_field, slice_field, slice_names or {})
    for file in files:
        reader = JsonlRecords(file)
        while (item := reader.next()) is not None:
            if (row := parse_jsonl_line(item[2], file, item[0] + 1, source)) is not None:
                yield row
        reader.close()


def _usable(row: dict) -> bool:
    """For Parquet and hub rows, which bypass our JSONL reader: count what is dropped, as it does."""
    if not isinstance(row["text"], str):
        SKIPPED["no text field"] = SKIPPED.get("no text field", 0) + 1
        return False
    if not row["text"].strip():
        SKIPPED["empty text"] = SKIPPED.get("empty text", 0) + 1
        return False
    return True


def load_text_stream(source: Source, files: list[str] | None = None):
    """A streaming `datasets.IterableDataset` of {"text", "slice"} rows: one shard per file (`files`,
    default all of the source's), or the hub repository's own builder when it has no data files."""
    from datasets import IterableDataset, load_dataset

    files = list(files if files is not None else source.files or [])
    slices = dict(slice_field=source.slice_field, slice_names=source.slice_names)
    if files and not files[0].endswith(".parquet"):
        kwargs = {"files": files, "text_field": source.text_field, **slices}
        return IterableDataset.from_generator(read_jsonl_documents, gen_kwargs=kwargs)
    try:
        if files:
            stream = load_dataset("parquet", data_files=files, split="train", streaming=True)
        else:
            stream = load_dataset(source.name, source.data_config, split="train", streaming=True)
        top = [source.text_field, *([source.slice_field.split(".")[0]] if source.slice_field else [])]
        stream = stream.select_columns(top)
    except Exception as e:  # offline, unknown name, gated repo, a loading script, no such column, a bad file:
        # datasets raises its own types and those of whatever it calls (OSError, ValueError, RuntimeError,
        # KeyError, pyarrow's), which differ by builder and release: no fixed set to name
        detail = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}" if str(e) else type(e).__name__
        if files:
            raise UsageError(
                f"could not read the Parquet files of {source.name!r} ({detail}); if the text is in another "
                "column, pass --text_field with its name"
            ) from None
        raise UsageError(
            f"could not open Hugging Face dataset {source.name!r} ({detail}), and it has no JSON/Parquet data files "
            "we could read either: pass -d with local JSONL/Parquet files (e.g. -d data/redpajama-sample), or --data_dir"
        ) from None
    rows = stream.map(lambda row: {"text": row[source.text_field], "slice": slice_of(row, **slices)})
    return rows.select_columns(["text", "slice"]).filter(_usable)


def slice_name(file: str) -> str:
    """RedPajama's slice of a file, from its name: `arxiv_024.jsonl` -> `arxiv`."""
    name = Path(file).name
    for suffix in DATA_SUFFIXES:
        name = name.removesuffix(suffix)
    return name.split("_")[0].split("-")[0].lower()
