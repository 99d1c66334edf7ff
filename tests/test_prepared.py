"""The offline data path: scripts/prepare_data.py writes a memory-mapped token file that holds exactly the
streaming path's token stream, and PreparedBatches reads it back as rows, per replica, resumably."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TOKENIZER, run_in_process, write_jsonl

from llama_recipe.data import DocumentStream
from llama_recipe.errors import UsageError
from llama_recipe.prepared import (
    PREPARED_META,
    PreparedBatches,
    check_prepared_tokenizer,
    is_prepared_dataset,
    permute,
    prepare_dataset,
)

WORDS = "packing joins documents each one ends with an end token so rows straddle them".split()
# Documents of varied lengths, some longer than a row, some a few tokens: rows start mid-document and hold several.
DOCUMENTS = [
    f"Document {i}: " + " ".join(WORDS[(i * j) % len(WORDS)] for j in range(1 + (i * 7) % 23)) for i in range(40)
]
DOCUMENTS[3] = "Ünïcödé, numbers 12345,\ttabs and\nnew lines tokenize too."
DOCUMENTS[5] = "A"
DOCUMENTS[8] = "A literal </s> in web text is text, not the end of a document."
SEQ_LEN = 16


def _texts(texts):
    return [{"text": t, "meta": {"n": i}} for i, t in enumerate(texts)]


def _stream(tokenizer, texts) -> list[int]:
    out = []
    for text in texts:
        out += tokenizer(text, split_special_tokens=True).input_ids + [tokenizer.eos_token_id]
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tokenizer):
    """DOCUMENTS split over two files of a directory, prepared once: (raw dir, prepared dir, stats, token stream)."""
    root = tmp_path_factory.mktemp("corpus")
    raw = root / "raw"
    raw.mkdir()
    write_jsonl(raw / "part-0.jsonl", _texts(DOCUMENTS[:25]))
    write_jsonl(raw / "part-1.jsonl", _texts(DOCUMENTS[25:]))
    stats = prepare_dataset(str(raw), str(root / "prepared"), tokenizer, progress=False)
    return raw, root / "prepared", stats, _stream(tokenizer, DOCUMENTS)


def _batches(corpus, batch_size=3, dp_rank=0, dp_size=1, seq_len=SEQ_LEN, shuffle=False, seed=0) -> PreparedBatches:
    return PreparedBatches(str(corpus[1]), seq_len, batch_size, dp_rank, dp_size, seed=seed, shuffle=shuffle)


def _rows(batches, n) -> list[list[int]]:
    return [row for _ in range(n) for row in batches.next_batch()["input_ids"].tolist()]


def _reference_positions(stream, eos) -> list[int]:
    positions, pos = [], 0
    for token in stream:
        positions.append(pos)
        pos = 0 if token == eos else pos + 1
    return positions


# ---------------------------------------------------------------------------------------------
# prepare


def test_prepare_writes_the_streaming_paths_token_stream(corpus, tokenizer):
    raw, prepared, stats, stream = corpus
    streamed = [t for doc in DocumentStream(str(raw), tokenizer, 0, 1) for t in doc["input_ids"]]
    assert streamed == stream  # the reference is the streaming path's own output
    tokens = np.fromfile(prepared / "tokens.bin", dtype="<u2")
    assert tokens.tolist() == stream

    assert stream.count(tokenizer.eos_token_id) == len(DOCUMENTS)  # EOS only at the ends, "</s>" text included
    lengths = [len(_stream(tokenizer, [t])) for t in DOCUMENTS]
    offsets = np.load(prepared / "doc_offsets.npy")
    assert offsets.dtype == np.int64
    assert offsets.tolist() == [0, *np.cumsum(lengths).tolist()]
    assert all(stream[end - 1] == tokenizer.eos_token_id for end in offsets[1:])
    assert all(stream[start] == tokenizer.bos_token_id for start in offsets[:-1])

    meta = json.loads((prepared / PREPARED_META).read_text())
    assert meta == {
        "format_version": 1,
        "dtype": "uint16",
        "num_tokens": len(stream),
        "num_docs": len(DOCUMENTS),
        "vocab_size": 32000,
        "max_token_id": max(stream),
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "tokenizer": TOKENIZER,
        "source": str(raw),
    }
    assert stats["num_docs"] == len(DOCUMENTS) and stats["num_tokens"] == len(stream) and stats["skipped"] == 0
    assert stats["seconds"] > 0 and stats["tokens_per_s"] == pytest.approx(stats["num_tokens"] / stats["seconds"])
    assert is_prepared_dataset(str(prepared)) and not is_prepared_dataset(str(raw))
    assert sorted(p.name for p in prepared.parent.iterdir()) == ["prepared", "raw"]  # no .prepared.tmp left


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_documents_without_text_are_skipped_and_counted(tmp_path, tokenizer, fmt):
    texts = ["first", "", "second one", None, "  \n ", "third"]
    if fmt == "jsonl":  # the JSONL reader skips unusable lines itself; prepare adds them to its count
        source = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts] + [{"content": "no text field"}])
    else:  # Parquet rows reach prepare as they are, nulls and blanks included
        import pyarrow as pa
        import pyarrow.parquet as pq

        source = tmp_path / "a.parquet"
        pq.write_table(pa.table({"text": texts + [""]}), source)
    stats = prepare_dataset(str(source), str(tmp_path / "out"), tokenizer, progress=False)
    assert (stats["num_docs"], stats["skipped"]) == (3, 4)
    tokens = np.fromfile(tmp_path / "out" / "tokens.bin", dtype="<u2").tolist()
    assert tokens == _stream(tokenizer, ["first", "second one", "third"])
    assert json.loads((tmp_path / "out" / PREPARED_META).read_text())["num_docs"] == 3


def test_a_failed_prepare_leaves_nothing_that_looks_prepared(tmp_path, tokenizer):
    # Every line is unusable: prepare fails after it has written tokens.bin and the offsets into .out.tmp.
    write_jsonl(tmp_path / "a.jsonl", [{"content": "no text field"}, {"text": ""}, {"text": "  \n"}])
    with pytest.raises(UsageError, match=r"no documents with non-empty text \(3 skipped\)"):
        prepare_dataset(str(tmp_path / "a.jsonl"), str(tmp_path / "out"), tokenizer, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]  # neither out nor .out.tmp


def test_prepare_replaces_a_prepared_directory_only_when_asked(tmp_path, tokenizer):
    write_jsonl(tmp_path / "a.jsonl", _texts(["one document"]))
    write_jsonl(tmp_path / "b.jsonl", _texts(["another document", "and a second"]))
    out = str(tmp_path / "out")
    prepare_dataset(str(tmp_path / "a.jsonl"), out, tokenizer, progress=False)
    with pytest.raises(UsageError, match="--overwrite"):
        prepare_dataset(str(tmp_path / "b.jsonl"), out, tokenizer, progress=False)
    assert json.loads((tmp_path / "out" / PREPARED_META).read_text())["num_docs"] == 1
    prepare_dataset(str(tmp_path / "b.jsonl"), out, tokenizer, progress=False, overwrite=True)
    assert json.loads((tmp_path / "out" / PREPARED_META).read_text())["num_docs"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl", "out"]  # no .out.old / .out.tmp
    with pytest.raises(UsageError, match="not a prepared dataset"):  # --overwrite never deletes other directories
        prepare_dataset(str(tmp_path / "b.jsonl"), str(tmp_path), tokenizer, progress=False, overwrite=True)


# ---------------------------------------------------------------------------------------------
# PreparedBatches


def test_rows_are_slices_of_the_stream_with_document_relative_positions(corpus, tokenizer):
    stream = corpus[3]
    batches = _batches(corpus, batch_size=3)
    assert batches.rows_per_replica == len(stream) // SEQ_LEN and batches.batches_per_epoch >= 4
    positions = _reference_positions(stream, tokenizer.eos_token_id)
    for b in range(batches.batches_per_epoch):
        batch = batches.next_batch()
        for key in ("input_ids", "labels", "position_ids"):
            assert batch[key].shape == (3, SEQ_LEN) and batch[key].dtype == torch.long, key
        assert torch.equal(batch["labels"], batch["input_ids"])
        for i in range(3):
            r = b * 3 + i
            assert batch["input_ids"][i].tolist() == stream[r * SEQ_LEN : (r + 1) * SEQ_LEN]
            assert batch["position_ids"][i].tolist() == positions[r * SEQ_LEN : (r + 1) * SEQ_LEN], r
    assert batches.epoch == 0
    # The corpus makes the check bite: rows that begin mid-document, and documents that begin mid-row.
    row_starts = [positions[r * SEQ_LEN] for r in range(batches.rows_per_replica)]
    assert any(p > SEQ_LEN for p in row_starts) and any(0 < p < SEQ_LEN for p in row_starts)
    assert any(positions[r * SEQ_LEN + 1 : (r + 1) * SEQ_LEN].count(0) >= 2 for r in range(len(row_starts)))


def test_two_replicas_split_the_rows_and_wrap_at_the_epoch(corpus):
    stream = corpus[3]
    num_rows = len(stream) // SEQ_LEN
    rows = [stream[r * SEQ_LEN : (r + 1) * SEQ_LEN] for r in range(num_rows)]
    seen = []
    for dp_rank in range(2):
        batches = _batches(corpus, batch_size=1, dp_rank=dp_rank, dp_size=2)
        per_replica = batches.rows_per_replica
        assert per_replica == num_rows // 2
        epoch0 = _rows(batches, per_replica)
        assert epoch0 == rows[dp_rank : 2 * per_replica : 2]
        assert batches.epoch == 0  # the wrap happens when the next row is asked for
        assert _rows(batches, per_replica) == epoch0 and batches.epoch == 1
        seen.append({dp_rank + 2 * j for j in range(per_replica)})  # the global row numbers checked above
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(2 * (num_rows // 2)))


def _take(batches, n) -> list[dict]:
    return [batches.next_batch() for _ in range(n)]


def test_shuffled_rows_each_once_per_epoch_in_a_new_order(corpus):
    """With shuffle (pretrain.py's default) every epoch visits every row once, split between the
    replicas, in an order that depends on the seed and the epoch."""
    stream = corpus[3]
    num_rows = len(stream) // SEQ_LEN
    index = {tuple(stream[r * SEQ_LEN : (r + 1) * SEQ_LEN]): r for r in range(num_rows)}
    orders = {}
    for seed in (0, 1):
        for epoch in (0, 1):
            shares = []
            for dp_rank in range(2):
                batches = _batches(corpus, batch_size=1, dp_rank=dp_rank, dp_size=2, shuffle=True, seed=seed)
                rows = _rows(batches, batches.rows_per_replica * (epoch + 1))[batches.rows_per_replica * epoch :]
                shares.append([index[tuple(row)] for row in rows])
            assert not set(shares[0]) & set(shares[1]) and len(set(shares[0] + shares[1])) == 2 * (num_rows // 2)
            orders[seed, epoch] = shares[0]
    assert orders[0, 0] != orders[0, 1] and orders[0, 0] != orders[1, 0]
    assert orders[0, 0] != sorted(orders[0, 0])  # not the file order


def test_permute_is_a_bijection_for_any_size():
    for n in (1, 2, 3, 17, 64, 1000, 4097):
        for key in (0, 1, 12345):
            assert sorted(permute(np.arange(n), n, key).tolist()) == list(range(n)), (n, key)
    assert permute(np.arange(50), 50, 1).tolist() != permute(np.arange(50), 50, 2).tolist()


@pytest.mark.parametrize("shuffle", [False, True], ids=["file-order", "shuffled"])
@pytest.mark.parametrize("k", [2, 4, 6, 9])
def test_resume_continues_exactly(corpus, k, shuffle):
    after, batch_size = 6, 9
    reference = _take(_batches(corpus, batch_size, shuffle=shuffle), k + after)
    per_epoch = _batches(corpus, batch_size).batches_per_epoch
    assert per_epoch == 6  # k = 2, 4 resume inside epoch 0, 6 exactly at its end, 9 inside epoch 1; reads cross a wrap
    assert _batches(corpus, batch_size).rows_per_replica == per_epoch * batch_size

    first = _batches(corpus, batch_size, shuffle=shuffle)
    _take(first, k)
    state = json.loads(json.dumps(first.state_dict()))
    second = _batches(corpus, batch_size, shuffle=shuffle)
    second.load_state_dict(state)
    assert second.epoch == first.epoch
    resumed = _take(second, after)
    for want, got in zip(reference[k:], resumed, strict=True):
        for key in want:
            assert torch.equal(want[key], got[key]), key
    assert second.epoch == (k + after - 1) // per_epoch  # the wrap comes with the first row of the next epoch


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2), (2, 3)])
def test_resume_under_another_number_of_replicas_continues_the_global_order(corpus, before, after):
    """Elastic resume: `before` replicas read some rows each; `after` replicas continue from the same
    global position: over the epoch, every row once, none skipped, in the shuffled order."""
    stream = corpus[3]
    index = {tuple(stream[r * SEQ_LEN : (r + 1) * SEQ_LEN]): r for r in range(len(stream) // SEQ_LEN)}
    read = []
    for rank in range(before):
        first = _batches(corpus, batch_size=1, dp_rank=rank, dp_size=before, shuffle=True)
        read += [index[tuple(row)] for row in _rows(first, 5)]
    state = json.loads(json.dumps(first.state_dict()))  # every replica's position is the same: rank 0's will do
    rest = []
    for rank in range(after):
        second = _batches(corpus, batch_size=1, dp_rank=rank, dp_size=after, shuffle=True)
        second.load_state_dict(state)
        rest += [index[tuple(row)] for row in _rows(second, second.rows_per_replica - second.row)]
        assert second.epoch == 0
    used = min(_batches(corpus, dp_size=n).rows_per_replica * n for n in (before, after))
    assert len(set(read + rest)) == len(read + rest) >= used  # no row twice; the epoch's rows all read
    assert read + rest != sorted(read + rest)  # (and shuffled)


def test_resume_refuses_another_layout(corpus):
    with pytest.raises(UsageError, match="seq_len"):
        _batches(corpus, seq_len=SEQ_LEN * 2).load_state_dict(_batches(corpus).state_dict())
    with pytest.raises(UsageError, match="--seed"):  # the same position in another order is other rows
        _batches(corpus, shuffle=True, seed=1).load_state_dict(_batches(corpus, shuffle=True, seed=2).state_dict())


def test_constructor_names_the_problem(corpus, tmp_path):
    with pytest.raises(UsageError, match="not a prepared dataset.*prepare_data.py"):
        PreparedBatches(str(corpus[0]), SEQ_LEN, 1, 0, 1)
    num_rows = len(corpus[3]) // SEQ_LEN
    with pytest.raises(UsageError, match="fewer than one batch"):
        _batches(corpus, batch_size=num_rows // 2 + 1, dp_size=2)
    _batches(corpus, batch_size=num_rows // 2, dp_size=2)  # exactly enough is fine

    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("tokens.bin", "doc_offsets.npy"):
        (copy / name).write_bytes((corpus[1] / name).read_bytes())
    meta = json.loads((corpus[1] / PREPARED_META).read_text())
    (copy / PREPARED_META).write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(UsageError, match="format 99"):
        PreparedBatches(str(copy), SEQ_LEN, 1, 0, 1)


def test_check_prepared_tokenizer(corpus, tokenizer, tmp_path):
    check_prepared_tokenizer(str(corpus[1]), tokenizer)  # the tokenizer it was prepared with
    meta = json.loads((corpus[1] / PREPARED_META).read_text())
    (tmp_path / PREPARED_META).write_text(json.dumps({**meta, "vocab_size": 50257, "tokenizer": "gpt2"}))
    with pytest.raises(UsageError, match="50257.*32000.*--tokenizer gpt2"):
        check_prepared_tokenizer(str(tmp_path), tokenizer)


# ---------------------------------------------------------------------------------------------
# the CLI


def test_prepare_data_cli(tmp_path, tokenizer):
    write_jsonl(tmp_path / "a.jsonl", _texts(DOCUMENTS[:10]))
    out = tmp_path / "out"
    args = ["-d", str(tmp_path / "a.jsonl"), "-o", str(out), "--tokenizer", TOKENIZER]
    proc = run_in_process("scripts/prepare_data.py", args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    num_tokens = len(_stream(tokenizer, DOCUMENTS[:10]))
    summary = proc.stdout.strip().splitlines()[-1]
    assert f"10 docs, {num_tokens:,} tokens (0 skipped docs)" in summary and "tokens/s" in summary
    assert str(out) in summary
    assert is_prepared_dataset(str(out))

    again = run_in_process("scripts/prepare_data.py", args)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "--overwrite" in again.stderr

    missing = run_in_process(
        "scripts/prepare_data.py", ["-d", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "x")]
    )
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr
    assert missing.stderr.startswith("error: ") and "missing.jsonl" in missing.stderr
    assert "Traceback" not in missing.stderr and not (tmp_path / "x").exists()


def test_max_tokens_stops_after_whole_documents(corpus, tokenizer, tmp_path):
    raw, _, _, stream = corpus
    lengths = [len(_stream(tokenizer, [t])) for t in DOCUMENTS]
    budget = sum(lengths[:7]) + lengths[7] // 2  # seven documents and half of the eighth
    stats = prepare_dataset(str(raw), str(tmp_path / "out"), tokenizer, progress=False, max_tokens=budget)
    assert (stats["num_docs"], stats["num_tokens"]) == (7, sum(lengths[:7]))
    assert np.fromfile(tmp_path / "out" / "tokens.bin", dtype="<u2").tolist() == stream[: sum(lengths[:7])]
