"""The streaming data path: document positions, tolerant reading, mixtures, read-ahead that keeps
checkpoints exact, and which batches each rank of a layout really gets."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch
from conftest import DATA, check_ok, launch, write_jsonl

from llama_recipe.data import (
    SKIPPED,
    Prefetcher,
    build_pretrain_batches,
    document_positions,
    parse_data_mix,
    read_jsonl_documents,
)
from llama_recipe.errors import UsageError


def reference_positions(tokens: list[int], first: int, eos: int) -> list[int]:
    out, position = [], first
    for token in tokens:
        out.append(position)
        position = 0 if token == eos else position + 1
    return out


def test_document_positions_match_a_plain_loop():
    eos = 2
    rng = np.random.default_rng(0)
    for first in (0, 7):
        tokens = rng.choice([2, 5, 9, 11], size=200, p=[0.05, 0.35, 0.3, 0.3])
        assert document_positions(tokens, first, eos).tolist() == reference_positions(tokens.tolist(), first, eos)


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
