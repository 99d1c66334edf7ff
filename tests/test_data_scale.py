"""The stream at the scale users run it, simulated: files that dwarf the shuffle buffer, every
window of training reflecting the corpus, a data state that stays small with 4,096-token rows of
book-length documents, and resumes that change the number of replicas without losing or repeating
a document. In-process: the data path alone, no model."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from llama_recipe.data import DocumentStream, PackedRows, build_pretrain_batches
from llama_recipe.document_order import OPEN_FILES

# RedPajama's slices by documents (the LLaMA paper's mixture; Common Crawl in five dumps, as in the
# sample's cc_2019-30 ... cc_2023-06 files).
REDPAJAMA_SHARES = {
    **{f"cc_{dump}": 0.67 / 5 for dump in ("2019-30", "2020-05", "2021-04", "2022-05", "2023-06")},
    "c4": 0.15,
    "github": 0.045,
    "arxiv": 0.023,
    "book": 0.02,
    "wikipedia": 0.02,
    "stackexchange": 0.017,
}
BUFFER = 16  # documents (and rows) in the shuffle buffers: every file holds 20x that or more
WINDOW = 2000  # documents


def _write_corpus(root: Path, documents: int, words: tuple[int, int] = (1, 12), seed: int = 0) -> dict[str, int]:
    """One JSON-lines file per slice, `documents` in RedPajama's proportions; {file: documents}."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, share in REDPAJAMA_SHARES.items():
        counts[f"{name}_sample.jsonl"] = n = round(share * documents)
        lines = (json.dumps({"text": f"{name} {i} " + "w " * int(rng.integers(*words))}) for i in range(n))
        (root / f"{name}_sample.jsonl").write_text("\n".join(lines) + "\n")
    return counts


@pytest.fixture(scope="module")
def redpajama_shaped(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    root = tmp_path_factory.mktemp("redpajama") / "corpus"
    return root, _write_corpus(root, 20_000)


def _file_of(stream: DocumentStream, document: dict) -> str:
    return Path(stream.source.files[document["ref"][0]]).name


@pytest.mark.parametrize("replicas", [1, 2])
def test_every_window_of_a_replica_reflects_the_corpus(redpajama_shaped, tokenizer, replicas):
    """In every window of 2,000 consecutive documents of a replica, each file with at least 4% of
    the corpus has its corpus share within +-30% (a uniformly random order's worst window is ~15-20%
    off here). Reading the files one after another, a window holds one or two files."""
    root, counts = redpajama_shaped
    total = sum(counts.values())
    assert min(counts.values()) >= 20 * BUFFER and len(counts) <= OPEN_FILES
    large = {name: n / total for name, n in counts.items() if n / total >= 0.04}
    stream = DocumentStream(str(root), tokenizer, replicas - 1, replicas, seed=1, shuffle_buffer=BUFFER)
    files = [_file_of(stream, document) for document in stream]
    assert len(files) in (total // replicas, total // replicas + 1)
    windows = [Counter(files[i : i + WINDOW]) for i in range(0, len(files) - WINDOW + 1, WINDOW)]
    worst = max(abs(window[name] / WINDOW / share - 1) for window in windows for name, share in large.items())
    assert len(windows) >= 4 and worst <= 0.30, f"a window is {worst:.0%} off its corpus share"


def _consume(stream, n: int) -> list:
    """The refs of the next `n` documents (fewer where the epoch ends)."""
    refs = []
    for document in stream:
        refs.append(tuple(document["ref"]))
        if len(refs) == n:
            break
    return refs


def _roundtrip(state: dict) -> dict:
    return json.loads(json.dumps(state))


@pytest.mark.parametrize("before,after", [(2, 1), (2, 3), (3, 2), (1, 2)])
def test_a_stream_resumed_on_another_number_of_replicas_reads_every_document_once(tmp_path, tokenizer, before, after):
    """Replicas stop at different points of the epoch (they consume tokens, not documents), with
    full buffers; the new replicas go on from their states to the epoch's end. Together: every
    document of the epoch exactly once, none lost from a buffer, none read twice."""
    counts = _write_corpus(tmp_path, 1500)

    def stream(rank: int, size: int) -> DocumentStream:
        return DocumentStream(str(tmp_path), tokenizer, rank, size, seed=4, shuffle_buffer=BUFFER)

    old = [stream(r, before) for r in range(before)]
    seen = [ref for r, s in enumerate(old) for ref in _consume(s, 150 + 60 * r)]
    states = [_roundtrip(s.state_dict()) for s in old]
    new = [stream(r, after) for r in range(after)]
    for s in new:
        s.load_elastic(states)
    shares = [_consume(s, 10**9) for s in new]
    seen += [ref for share in shares for ref in share]
    repeated = [ref for ref, n in Counter(seen).items() if n > 1]
    assert not repeated, f"{len(repeated)} documents read twice"
    assert len(seen) == sum(counts.values())  # and none lost
    assert min(map(len, shares)) > 0.8 * max(map(len, shares))  # the rest of the epoch shared out evenly


def test_a_mixture_resumed_on_another_number_of_replicas(tmp_path, tokenizer):
    """--data_mix, 2 -> 3 replicas: each slice's first epoch is read exactly once over the old and
    the new replicas (a slice that runs out starts its next epoch on its own), and after the resume
    the slices' token shares stay at their weights."""
    counts = _write_corpus(tmp_path, 1200)
    weights = {"cc": 0.5, "c4": 0.3, "github": 0.2}

    def mixture(rank: int, size: int):
        spec = ",".join(f"{name}={w}" for name, w in weights.items())
        return build_pretrain_batches(str(tmp_path), tokenizer, 64, 2, rank, size, spec, seed=2, shuffle_buffer=BUFFER)

    def read(documents, stop) -> tuple[list, Counter]:
        first_epoch, tokens = [], Counter()
        for document in documents:
            name = Path(documents.source.files[document["ref"][0]]).name.split("_")[0]
            if documents.epochs[name] == 0:
                first_epoch.append((name, tuple(document["ref"])))
            tokens[name] += len(document["input_ids"])
            if stop(documents, tokens):
                break
        return first_epoch, tokens

    old = [mixture(r, 2).rows.documents for r in range(2)]
    seen = []
    for r, documents in enumerate(old):  # replicas stop at different points
        seen += read(documents, lambda m, t, tokens=3000 + 1000 * r: sum(t.values()) > tokens)[0]
    states = [_roundtrip(m.state_dict()) for m in old]
    after = Counter()
    for r in range(3):
        new = mixture(r, 3).rows.documents
        new.load_elastic(states)
        first_epoch, tokens = read(new, lambda m, t: min(m.epochs.values()) >= 1)
        seen += first_epoch
        after += tokens
    repeated = [ref for ref, n in Counter(seen).items() if n > 1]
    assert not repeated, f"{len(repeated)} documents read twice in their slice's first epoch"
    for name in weights:
        files = [f for f in counts if f.startswith(name)]
        assert sum(1 for slice_name, _ in seen if slice_name == name) == sum(counts[f] for f in files), name
    total = sum(after.values())
    for name, weight in weights.items():
        assert after[name] / total == pytest.approx(weight, abs=0.03), (name, after)


def test_packed_rows_move_to_another_number_of_replicas_whole(tmp_path, tokenizer):
    """The leftovers and buffered rows of 3 replicas, dealt to 2: the same pieces of the same
    documents, re-read into the same tokens; nothing dropped, nothing doubled."""
    _write_corpus(tmp_path, 600, words=(20, 200))

    def rows(rank: int, size: int) -> PackedRows:
        documents = DocumentStream(str(tmp_path), tokenizer, rank, size, seed=3, shuffle_buffer=BUFFER)
        return PackedRows(documents, 96, tokenizer.eos_token_id, BUFFER, seed=3, dp_rank=rank)

    old = [rows(r, 3) for r in range(3)]
    for r, packed in enumerate(old):
        iterator = iter(packed)
        for _ in range(30 + 5 * r):
            next(iterator)
    states = [_roundtrip(p.state_dict()) for p in old]
    new = [rows(r, 2) for r in range(2)]
    for packed in new:
        packed.load_elastic(states, 2)

    def held(packs) -> Counter:  # (piece, its tokens) of every buffered row and leftover
        return Counter(
            (tuple(piece), tuple(tokens[i : i + piece[4] - piece[3]]))
            for p in packs
            for tokens, pieces in [*p.rows, (p.leftover, p.leftover_pieces)]
            for i, piece in zip(np.cumsum([0] + [q[4] - q[3] for q in pieces])[:-1], pieces, strict=True)
        )

    assert held(new) == held(old) and sum(held(old).values()) > 3 * BUFFER
    assert abs(len(new[0].rows) - len(new[1].rows)) <= 1


def test_the_data_state_stays_small_with_long_rows_of_books(tmp_path, tokenizer):
    """-l 4096, the default buffers (1,000 documents, 1,000 rows), documents of ~8,000 tokens (two rows and more each): the
    state names pieces of documents, not their text: well under 1 MB (the text it stands for is
    ~4 million tokens)."""
    rng = np.random.default_rng(0)
    words = ["the", "history", "of", "a", "long", "river", "and", "its", "people", "said"]
    chapters = [" ".join(rng.choice(words, size=6000)) for _ in range(10)]
    books = (f"book {i}: {chapters[i % 10]}" for i in range(1800))
    (tmp_path / "book_a.jsonl").write_text("\n".join(json.dumps({"text": text}) for text in books) + "\n")
    batches = build_pretrain_batches(str(tmp_path), tokenizer, 4096, 2, 0, 1, seed=0, shuffle_buffer=1000)
    batches.next_batch()
    state = json.dumps(batches.state_dict())
    assert len(batches.rows.rows) == 1000 and len(batches.rows.documents.buffer) == 1000
    print(f"data state: {len(state):,} bytes")
    assert len(state) < 1_000_000, f"{len(state):,} bytes"


def test_a_hub_dataset_with_only_its_own_builder_points_to_prepare_data(tokenizer):
    """No data files to address by record: streaming is refused in one line naming the way that works."""
    from llama_recipe.errors import UsageError
    from llama_recipe.sources import Source

    with pytest.raises(UsageError, match="scripts/prepare_data.py"):
        DocumentStream(Source("someone/builder-only", None), tokenizer, 0, 1)
