"""The streaming data path: document positions, tolerant reading, mixtures, read-ahead that keeps
checkpoints exact, and which batches each rank of a layout really gets."""

from __future__ import annotations

import gzip
import json

import pytest
import torch
from conftest import DATA, TINY_RUN, check_ok, launch, read_scalars, run_in_process, trainer_batches, write_jsonl

from llama_recipe.data import DocumentStream, Prefetcher, build_pretrain_batches, parse_data_mix
from llama_recipe.errors import UsageError
from llama_recipe.sources import SKIPPED, read_jsonl_documents


def reference_positions(tokens: list[int], first: int, eos: int) -> list[int]:
    out, position = [], first
    for token in tokens:
        out.append(position)
        position = 0 if token == eos else position + 1
    return out


def test_packed_rows_carry_document_positions_across_rows(tmp_path, tokenizer):
    docs = [f"document number {i} " + "word " * (3 + 5 * i) for i in range(12)]
    write_jsonl(tmp_path / "a.jsonl", docs)
    batches = build_pretrain_batches(str(tmp_path / "a.jsonl"), tokenizer, 16, 2, 0, 1)
    rows, positions = [], []
    for _ in range(6):
        batch = batches.next_batch()
        rows += batch["input_ids"].flatten().tolist()
        positions += batch["position_ids"].flatten().tolist()
    assert positions == reference_positions(rows, 0, tokenizer.eos_token_id)
    assert positions.count(0) >= 5  # documents really restart
    assert any(p > 16 for p in positions)  # and positions continue across row boundaries


def test_unusable_lines_are_skipped_and_counted(tmp_path, capfd):
    good = [{"text": "first good"}, {"text": "second good", "meta": {"x": 1}}, {"text": "third good"}]
    lines = [
        json.dumps(good[0]).encode(),
        b"{not json",
        json.dumps({"content": "no text field"}).encode(),
        json.dumps({"text": "   "}).encode(),
        b'{"text": "bad \xff\xfe bytes"}',
        json.dumps(["a list"]).encode(),
        json.dumps(good[1]).encode(),
        b"",
    ]
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps(good[2]) + "\n")
    SKIPPED.clear()
    texts = [d["text"] for d in read_jsonl_documents([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl.gz")])]
    assert texts == ["first good", "second good", "third good"]
    assert SKIPPED == {"not valid JSON": 1, "no text field": 2, "empty text": 1, "not valid UTF-8": 1}
    warnings = capfd.readouterr().err.strip().splitlines()
    assert len(warnings) == 5 and "a.jsonl line 2: not valid JSON; skipped" in warnings[0]


def test_data_mix_parsing():
    assert parse_data_mix("arxiv=1,book=3") == {"arxiv": 0.25, "book": 0.75}
    assert sum(parse_data_mix("llama").values()) == pytest.approx(1.0)
    for bad in ("arxiv", "arxiv=x", "arxiv=-1,book=2", "arxiv=0"):
        with pytest.raises(UsageError):
            parse_data_mix(bad)


def test_mixture_hits_its_token_weights(tokenizer):
    """Over a long draw each slice's share of tokens is within 1% of its weight, though the slices'
    natural sizes differ by ~10x (wikipedia 0.6M tokens vs arxiv 51K in the sample)."""
    weights = {"wikipedia": 0.5, "stackexchange": 0.3, "arxiv": 0.2}
    batches = build_pretrain_batches(str(DATA), tokenizer, 512, 8, 0, 1, data_mix="wikipedia=5,stackexchange=3,arxiv=2")
    for _ in range(80):  # ~330K tokens: 20% of that is more than arxiv's 51K, so it is recycled
        batches.next_batch()
    mixer = batches.rows.documents
    total = sum(mixer.tokens.values())
    assert total >= 80 * 8 * 512
    for name, weight in weights.items():
        assert mixer.tokens[name] / total == pytest.approx(weight, abs=0.01), mixer.tokens
    assert mixer.epochs["arxiv"] >= 1  # the small slice was recycled, as its weight demands


def test_mixture_and_read_ahead_resume_exactly(tokenizer):
    def make():
        return Prefetcher(build_pretrain_batches(str(DATA), tokenizer, 256, 4, 0, 1, data_mix="wikipedia=1,arxiv=1"))

    reference = make()
    expected = [reference.next_batch() for _ in range(30)]
    reference.close()
    for k in (1, 9, 22):  # the arxiv slice wraps around between these points
        run = make()
        for _ in range(k):
            run.next_batch()
        state = json.loads(json.dumps(run.state_dict()))  # what a checkpoint stores, taken with batches read ahead
        run.close()
        resumed = make()
        resumed.load_state_dict(state)
        for i in range(k, k + 5):
            batch = resumed.next_batch()
            assert torch.equal(batch["input_ids"], expected[i]["input_ids"]), f"k={k}, batch {i}"
            assert torch.equal(batch["position_ids"], expected[i]["position_ids"])
        resumed.close()


def test_read_ahead_passes_data_errors_to_the_trainer(tmp_path, tokenizer):
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    batches = Prefetcher(build_pretrain_batches(str(tmp_path / "empty.jsonl"), tokenizer, 16, 1, 0, 1))
    with pytest.raises(UsageError, match="no documents"):
        batches.next_batch()


PROBED_LAYOUTS = {"hybrid_parallel:2:1": True, "hybrid_parallel:1:2": True, "zero2:1:1": False}  # -> same batches?


@pytest.fixture(scope="module")
def probed_batches(tmp_path_factory) -> dict[str, list[dict]]:
    """What each of 2 ranks reads under each layout, from one 2-process job: {layout: [rank 0, rank 1]}."""
    out = tmp_path_factory.mktemp("batches")
    check_ok(launch("tests/batches_probe.py", [str(out), *PROBED_LAYOUTS], nproc=2))
    return {
        layout: [json.loads((out / f"{i}-rank-{r}.json").read_text()) for r in range(2)]
        for i, layout in enumerate(PROBED_LAYOUTS)
    }


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", list(PROBED_LAYOUTS))
def test_which_batches_each_rank_reads(probed_batches, layout):
    """TP and PP ranks of one replica read identical batches; data-parallel replicas read different ones."""
    ranks = probed_batches[layout]
    if PROBED_LAYOUTS[layout]:
        assert ranks[0]["dp_rank"] == ranks[1]["dp_rank"] == 0
        assert ranks[0]["digests"] == ranks[1]["digests"]
    else:
        assert [r["dp_rank"] for r in ranks] == [0, 1]
        assert not set(ranks[0]["digests"]) & set(ranks[1]["digests"])


# ---------------------------------------------------------------------------------------------
# Shuffled order


def _corpus(root, n_files: int = 6, per_file: int = 10) -> list[str]:
    """Short, distinct documents over several files; returns all texts."""
    texts = []
    for f in range(n_files):
        file_texts = [
            f"file {f} document {i}: " + " ".join(["word"] * (1 + (f * 7 + i * 3) % 11)) for i in range(per_file)
        ]
        write_jsonl(root / f"part-{f}.jsonl", file_texts)
        texts += file_texts
    return texts


def _epoch_texts(stream, tokenizer, epoch: int) -> list[str]:
    stream.set_epoch(epoch)
    return [tokenizer.decode(doc["input_ids"][1:-1]) for doc in stream]  # without BOS and EOS


def test_order_follows_the_seed_and_the_epoch(tmp_path, tokenizer):
    texts = _corpus(tmp_path)

    def order(seed: int, epoch: int) -> list[str]:
        return _epoch_texts(
            DocumentStream(str(tmp_path), tokenizer, 0, 1, seed=seed, shuffle_buffer=8), tokenizer, epoch
        )

    first = order(1, 0)
    assert sorted(first) == sorted(texts)  # a permutation of the corpus
    assert order(1, 0) == first  # the same seed: the same order
    assert order(2, 0) != first and order(1, 1) != first  # another seed or epoch: another one
    unshuffled = _epoch_texts(DocumentStream(str(tmp_path), tokenizer, 0, 1), tokenizer, 0)
    assert unshuffled == texts != first  # --shuffle_buffer 0: file order


@pytest.mark.parametrize("n_files", [16, 5])
def test_every_document_once_per_epoch_across_two_replicas(tmp_path, tokenizer, n_files):
    texts = _corpus(tmp_path, n_files=n_files, per_file=4)
    streams = [DocumentStream(str(tmp_path), tokenizer, r, 2, seed=5, shuffle_buffer=8) for r in range(2)]
    for epoch in (0, 1):
        shares = [_epoch_texts(stream, tokenizer, epoch) for stream in streams]
        assert sorted(shares[0] + shares[1]) == sorted(texts)  # together: every document, each once
        assert shares[0] and shares[1]


def _resume_matches(make, k: int, n: int) -> None:
    """k batches, a checkpoint of the position (through JSON), then the next n batches of a new
    stream loaded from it equal those of the uninterrupted stream."""
    reference = make()
    expected = [reference.next_batch() for _ in range(k + n)]
    first = make()
    for _ in range(k):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))
    resumed = make()
    resumed.load_state_dict(state)
    for i in range(k, k + n):
        batch = resumed.next_batch()
        assert torch.equal(batch["input_ids"], expected[i]["input_ids"]), f"batch {i} after resuming at {k}"
        assert torch.equal(batch["position_ids"], expected[i]["position_ids"])


@pytest.mark.parametrize("dp_rank,dp_size", [(0, 1), (1, 2)], ids=["1-replica", "replica-1-of-2"])
@pytest.mark.parametrize("k", [1, 4, 9, 14])
def test_resume_with_a_full_shuffle_buffer_is_exact(tmp_path, tokenizer, k, dp_rank, dp_size):
    """The buffer (16 documents) is full from the first batch on; an epoch is ~11 batches for one
    replica (~5 for each of two), so later k resume while it drains and after the epoch boundary."""
    _corpus(tmp_path)

    def make():
        return build_pretrain_batches(str(tmp_path), tokenizer, 48, 2, dp_rank, dp_size, seed=3, shuffle_buffer=16)

    assert make().rows.documents.shuffle_buffer == 16
    _resume_matches(make, k, 5)


@pytest.mark.parametrize("k", [1, 9, 22])
def test_a_shuffled_mixture_resumes_exactly(tokenizer, k):
    def make():
        return Prefetcher(
            build_pretrain_batches(str(DATA), tokenizer, 256, 4, 0, 1, "wikipedia=1,arxiv=1", seed=7, shuffle_buffer=32)
        )

    _resume_matches(make, k, 4)


def test_a_mixture_run_logs_its_slice_shares(tmp_path):
    """pretrain.py --data_mix: per-slice tokens and shares in TensorBoard, and the shares in the final line."""
    args = [
        *TINY_RUN,
        "-p",
        "ddp",
        "--data_mix",
        "wikipedia=3,arxiv=1",
        "--max_steps",
        "4",
        "-o",
        "",
        "-t",
        str(tmp_path),
    ]
    proc = run_in_process("pretrain.py", args)
    check_ok(proc)
    wiki, arxiv = (read_scalars(tmp_path, f"data/tokens_{name}") for name in ("wikipedia", "arxiv"))
    assert sorted(wiki) == sorted(arxiv) == [1, 2, 3, 4] and wiki[4] >= wiki[1] > 0
    shares = read_scalars(tmp_path, "data/share_wikipedia")
    assert shares[4] == pytest.approx(wiki[4] / (wiki[4] + arxiv[4]))
    expected = f"mixture (rank 0): wikipedia {100 * shares[4]:.1f}% ({int(wiki[4]):,} tokens), arxiv"
    assert expected in proc.stdout, proc.stdout[-500:]
    assert "warning: predicted peak" not in proc.stdout  # tiny fits this machine's memory (planner.fit_warning)


def test_a_quarantine_reaches_past_the_read_ahead(tokenizer):
    """Documents quarantined after the trainer took 3 batches, while the read-ahead thread holds the
    next 2 already made: the Prefetcher then gives exactly the batches of a stream quarantined in place
    at that point, none holding those documents, and its state (what a checkpoint saves) lists them."""
    import time

    ahead, plain = Prefetcher(trainer_batches(tokenizer, 0, 1)), trainer_batches(tokenizer, 0, 1)
    for _ in range(3):
        assert torch.equal(ahead.next_batch()["input_ids"], plain.next_batch()["input_ids"])
    quarantined = ahead.provenance["documents"]
    while ahead._queue.qsize() < ahead.depth:  # the next batches made, with the documents in them
        time.sleep(0.01)
    ahead.add_quarantine(quarantined)
    plain.add_quarantine(quarantined)
    assert ahead.state_dict()["quarantine"] == sorted(quarantined)
    for _ in range(8):
        assert torch.equal(ahead.next_batch()["input_ids"], plain.next_batch()["input_ids"])
        assert not {tuple(d) for d in ahead.provenance["documents"]} & {tuple(d) for d in quarantined}
    ahead.close()


def test_the_row_buffer_is_sized_on_its_own(tmp_path, tokenizer):
    """--shuffle_rows: a long document's rows come spread out even with a small document buffer."""
    write_jsonl(tmp_path / "book_a.jsonl", ["chapter " + "word " * 3000, "short one", "short two"])

    def rows(shuffle_rows):
        batches = build_pretrain_batches(
            str(tmp_path), tokenizer, 64, 8, 0, 1, shuffle_buffer=0, shuffle_rows=shuffle_rows
        )
        return [tuple(row) for row in batches.next_batch()["input_ids"].tolist()]

    in_order, spread = rows(0), rows(32)
    assert in_order == rows(None) and spread != in_order  # None: as many rows as documents (0 here)
    assert in_order[0][1:3] == tuple(tokenizer("chapter word", add_special_tokens=False)["input_ids"][:2])
