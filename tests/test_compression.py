"""PowerSGD on data-parallel gradients (`--grad_compression powersgd`) and compressed
backpropagation between pipeline stages (`--compress_backprop`), llama_recipe/compression.py.

One 2-process launch (tests/compression_worker.py) checks the arithmetic over a real gloo group,
shows the DDP bucket-order pitfall of torch's own hook against ours, trains `tiny` compressed under
-p ddp with a checkpoint at step 3 and resumes from it; one 4-process launch (pp 2 x dp 2) does
the same with selective stage compression and compressed backpropagation. The tests below assert on
what they wrote; CB's arithmetic is tested in this process. The refusals are cases of test_bad_input.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DATA, TINY_RUN, check_ok, expect_one_line_error, launch, read_scalars, run_in_process
from safetensors.torch import load_file

from llama_recipe.compression import BackpropCompression, backprop_payload_bytes
from llama_recipe.model import get_model_config

RANK = 4  # the worker's --powersgd_rank (the default)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("compression")
    check_ok(launch("tests/compression_worker.py", [str(out)], nproc=2, timeout=600))
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return dict(out=out, ranks=ranks, rank0=ranks[0])


@pytest.fixture(scope="module")
def pipeline_job(tmp_path_factory):
    """4 processes: hybrid_parallel pp 2 x dp 2, --compress_stages 1, trained and resumed."""
    out = tmp_path_factory.mktemp("compression_pipeline")
    check_ok(launch("tests/compression_worker.py", [str(out), "pipeline"], nproc=4, timeout=600))
    return dict(out=out, ranks=[json.loads((out / f"pipeline-rank{r}.json").read_text()) for r in range(4)])


def tiny_gradient_bytes(rank: int, stage: int | None = None) -> tuple[int, int]:
    """(bytes one compressed step sends, bytes an exact all-reduce sends) for `tiny` (or one stage of
    it split in two: embeddings and layer 0 | layer 1, the final norm and the LM head), counted from
    its shapes by hand: rank * (n + m) per weight matrix (all of tiny's shrink at least 2x at rank 4),
    every element of the norms' vectors; fp32."""
    c = get_model_config("tiny")
    h, inter, vocab, layers = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_hidden_layers
    kv = c.num_key_value_heads * (h // c.num_attention_heads)
    layer = [(h, h), (kv, h), (kv, h), (h, h), (inter, h), (inter, h), (h, inter)]
    if stage is None:
        matrices = [(vocab, h), (vocab, h), *layers * layer]  # embeddings and the (untied) LM head
        vectors = (2 * layers + 1) * h  # two norms per layer and the final one
    else:
        matrices, vectors = [(vocab, h), *layer], 2 * h + stage * h
    sent = sum(rank * (n + m) for n, m in matrices) + vectors
    exact = sum(n * m for n, m in matrices) + vectors
    return 4 * sent, 4 * exact


@pytest.mark.multiprocess
def test_rank_at_least_the_matrix_rank_reproduces_the_exact_all_reduce(job):
    # each replica's matrices have rank 1, so their mean has rank <= 2
    errors = {int(r): e for r, e in job["rank0"]["exact"].items()}
    assert errors[2] < 1e-5 and errors[4] < 1e-5, errors
    assert errors[1] > 0.1, errors  # rank 1 cannot: the check sees a wrong result
    # --powersgd_log_cosine's diagnostic on the same syncs: 1 where exact, clearly below where not
    cosine = {int(r): c for r, c in job["rank0"]["cosine"].items()}
    assert cosine[2] == pytest.approx(1, abs=1e-6) and cosine[4] == pytest.approx(1, abs=1e-6), cosine
    assert cosine[1] < 0.99, cosine


@pytest.mark.multiprocess
def test_error_feedback_loses_nothing(job):
    """Sum of applied gradients + mean residual == sum of exact mean gradients (rank 2 of 16, 6 steps)."""
    ef, no_ef = job["rank0"]["error_feedback"], job["rank0"]["no_error_feedback"]
    assert ef["with_residual"] < 1e-5, ef
    assert ef["applied_only"] > 0.05, ef  # the residual really carries something
    assert no_ef["with_residual"] > 0.05, no_ef  # without error feedback what compression drops is lost


@pytest.mark.multiprocess
def test_state_by_parameter_survives_ddp_rebuilding_its_buckets(job):
    """A fresh DDP (resume) runs its first step in another bucket layout than the one it rebuilds:
    torch's hook, its state restored, applies a buffer to the wrong bucket (here it fails on the
    shapes); ours, keyed by parameter, resumes bit for bit."""
    for ranks in job["ranks"]:
        ours, torchs = ranks["bucket_order"]["ours"], ranks["bucket_order"]["torch"]
        assert ours["resumed"] == ours["uninterrupted"]
        assert torchs["resumed"] != torchs["uninterrupted"]
        assert ours["uninterrupted"][:3] == torchs["uninterrupted"][:3]  # same start; both compress from step 3


@pytest.mark.multiprocess
def test_compressed_training_falls_and_resumes_bit_for_bit(job):
    out = job["out"]
    losses, resumed = read_scalars(out / "tb_ddp"), read_scalars(out / "tb_ddp_resumed")
    assert len(losses) == 5 and losses[5] < losses[1] - 0.3, losses
    assert resumed == {step: losses[step] for step in (4, 5)}  # bit for bit, compression state restored
    for rank in (0, 1):
        assert (out / "ckpt_ddp" / "step-3" / "compression" / f"rank-{rank}.safetensors").is_file()
    hybrid = job["rank0"]["hybrid"]["losses"]  # hybrid_parallel, pp = 1: the same hook on its DDP
    assert hybrid[-1] < hybrid[0] - 0.3, hybrid


@pytest.mark.multiprocess
@pytest.mark.parametrize("plugin", ["ddp", "hybrid"])
def test_bytes_counted_where_sent_match_the_shapes(job, plugin):
    tb, run = job["out"] / f"tb_{plugin}", "train" if plugin == "ddp" else "hybrid"
    compressed, exact = tiny_gradient_bytes(RANK)
    sent, uncompressed = read_scalars(tb, "comm/dp_bytes_sent"), read_scalars(tb, "comm/dp_bytes_uncompressed")
    assert sent == {1: exact, 2: exact, 3: compressed, 4: compressed, 5: compressed}  # 2 exact steps first
    assert set(uncompressed.values()) == {exact}
    ratio = read_scalars(tb, "comm/compression_ratio")
    assert ratio[5] == pytest.approx(exact / compressed) and ratio[1] == 1.0
    if plugin == "ddp":  # trained with --powersgd_log_cosine: logged on compressed steps only
        cosine = read_scalars(tb, "comm/cosine")
        assert set(cosine) == {3, 4, 5} and all(0.05 < c < 1 for c in cosine.values()), cosine
    seconds = read_scalars(tb, "comm/compress_seconds")
    assert seconds[1] == 0.0 and all(seconds[s] > 0 for s in (3, 4, 5))
    # every rank sent the same (counted by each rank's own hook)
    per_rank = [[c["bytes_sent"] for c in r[run]["communication"]] for r in job["ranks"]]
    assert per_rank[0] == per_rank[1] == [exact, exact, *3 * [compressed]]


@pytest.mark.multiprocess
def test_changed_compression_flags_on_resume_are_refused(job):
    ckpt = job["out"] / "ckpt_ddp"
    run = ["-c", "tiny", "-d", str(DATA), "-l", "128", "-b", "2", "-s", "0", "--lr", "5e-3", "-p", "ddp", "--powersgd_log_cosine",
           "--max_steps", "5", "-o", str(ckpt), "-f", str(ckpt / "step-3"), "-t", ""]  # fmt: skip
    compressed = ["--grad_compression", "powersgd", "--powersgd_warmup", "0"]
    before = sorted(ckpt.rglob("*"))
    proc = run_in_process("pretrain.py", [*run, *compressed, "--powersgd_rank", "2"], env={"WORLD_SIZE": "2"})
    expect_one_line_error(proc, "--powersgd_rank 4 -> 2", "--reset_compression")
    proc = run_in_process("pretrain.py", run, env={"WORLD_SIZE": "2"})
    expect_one_line_error(proc, "--grad_compression 'powersgd' -> 'none'", "--reset_compression")
    assert sorted(ckpt.rglob("*")) == before


@pytest.mark.multiprocess
def test_selective_stage_compression_compresses_only_the_first_stages(pipeline_job):
    """--compress_stages 1 with pp 2 x dp 2: stage 0 sends the factors after 2 exact steps, stage 1
    the exact gradients every step (each rank's own counters); both train and resume bit for bit."""
    stages = sorted(r["stage"] for r in pipeline_job["ranks"])
    assert stages == [0, 0, 1, 1]
    for ranks in pipeline_job["ranks"]:
        compressed, exact = tiny_gradient_bytes(RANK, ranks["stage"])
        sent = [c["bytes_sent"] for c in ranks["train"]["communication"]]
        assert [c["bytes_uncompressed"] for c in ranks["train"]["communication"]] == 5 * [exact]
        assert sent == ([exact, exact, *3 * [compressed]] if ranks["stage"] == 0 else 5 * [exact])
        losses = ranks["train"]["losses"]
        assert losses[-1] < losses[0] - 0.3 and ranks["resumed"]["losses"] == losses[3:]


# -- compressed backpropagation (--compress_backprop): the codec in this process, then the pipeline launch


def low_rank(shape: tuple[int, int, int], rank: int, seed: int) -> torch.Tensor:
    """A [batch, seq, hidden] gradient whose (batch*seq x hidden) matrix has rank `rank`."""
    g = torch.Generator().manual_seed(seed)
    b, s, h = shape
    return (torch.randn(b * s, rank, generator=g) @ torch.randn(rank, h, generator=g)).view(b, s, h)


def round_trip(codec: BackpropCompression, grad: torch.Tensor, compress: bool = True) -> torch.Tensor:
    """What the previous stage receives for `grad`, through the objects ColossalAI's p2p would carry."""
    return codec.decode(codec.encode({"hidden_states": grad}, compress))["hidden_states"]


def relative_error(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).abs().max() / y.abs().max())


def test_backprop_message_of_rank_at_most_r_round_trips_exactly():
    shape = (2, 24, 16)
    for rank in (1, 3, 4):
        grad = low_rank(shape, rank, seed=rank)
        assert relative_error(round_trip(BackpropCompression(4, seed=1), grad), grad) < 1e-5, rank
    full = low_rank(shape, 8, seed=8)  # rank 8 > R = 4: the check sees the difference
    assert relative_error(round_trip(BackpropCompression(4, seed=1), full), full) > 0.05
    codec = BackpropCompression(4, seed=1)
    sent = codec.encode({"hidden_states": full})
    p, q = sent["hidden_states"]["powersgd_p"], sent["hidden_states"]["powersgd_q"]
    assert p.shape == (2, 24, 4) and q.shape == (16, 4)  # only the factors travel
    counts = codec.take()
    assert (counts.bytes_sent, counts.bytes_uncompressed) == backprop_payload_bytes(2, 24, 16, 4)
    assert round_trip(codec, full, compress=False) is full  # an exact send (epilogue-only's steady state)


def test_lazy_error_propagation_loses_nothing_and_resumes_exactly():
    """Sum over micro-batches (two steps of four) of what was sent + the final residual == sum of the
    exact gradients; a codec restored from the state after step 1 sends step 2 bit for bit."""
    shape, grads = (1, 32, 16), [low_rank((1, 32, 16), 16, seed=100 + i) for i in range(8)]
    codec = BackpropCompression(2, seed=3)
    received = [round_trip(codec, g) for g in grads[:4]]
    restored = BackpropCompression(2, seed=3)
    restored.load_state_dict(codec.state_dict())  # what a checkpoint after step 1 holds
    received += [round_trip(codec, g) for g in grads[4:]]
    resumed = [round_trip(restored, g) for g in grads[4:]]
    assert all(torch.equal(a, b) for a, b in zip(resumed, received[4:], strict=True))
    residual = codec.residuals["hidden_states"].view(shape)
    exact = sum(grads)
    assert relative_error(sum(received) + residual, exact) < 1e-5
    assert relative_error(sum(received), exact) > 0.05  # the residual really carries something


def backprop_bytes() -> tuple[int, int]:
    """(bytes of one compressed message, of one exact message) for the pipeline launch's micro-batches:
    `tiny`'s [1, 128, 64] activation gradient (--microbatch_size 1, -l 128), rank 4, fp32."""
    return backprop_payload_bytes(1, 128, get_model_config("tiny").hidden_size, RANK)


@pytest.mark.multiprocess
def test_compressed_backprop_sends_only_factors_trains_and_resumes_bit_for_bit(pipeline_job):
    """--compress_backprop 4 with pp 2 x dp 2: each step, stage 1 sends its 2 micro-batches' activation
    gradients to stage 0 as rank-4 factors (each rank's own counters; stage 0 sends none backward),
    the loss falls, and the resumed run (LEP residuals and Q restored) repeats the losses bit for bit.
    With --compress_backprop_epilogue_only only the last of the 2 (1F1B's flush send) is compressed."""
    compressed, exact = backprop_bytes()
    for ranks in pipeline_job["ranks"]:
        comm = ranks["train"]["communication"]
        on_stage_1 = ranks["stage"] == 1
        assert [c["pp_backward_bytes_sent"] for c in comm] == 5 * [2 * compressed if on_stage_1 else 0]
        assert [c["pp_backward_bytes_uncompressed"] for c in comm] == 5 * [2 * exact if on_stage_1 else 0]
        epilogue = [c["pp_backward_bytes_sent"] for c in ranks["epilogue"]["communication"]]
        assert epilogue == 2 * [compressed + exact if on_stage_1 else 0]
        losses = ranks["train"]["losses"]
        assert losses[-1] < losses[0] - 0.3 and ranks["resumed"]["losses"] == losses[3:]
    out = pipeline_job["out"]  # TensorBoard: rank 0's, summed over its pipeline's stages
    assert read_scalars(out / "tb_pipeline", "comm/pp_backward_bytes_sent") == {s: 2 * compressed for s in range(1, 6)}
    assert set(read_scalars(out / "tb_pipeline", "comm/pp_backward_bytes_uncompressed").values()) == {2 * exact}
    assert read_scalars(out / "tb_pipeline", "comm/pp_backward_ratio")[1] == pytest.approx(exact / compressed)
    assert read_scalars(out / "tb_pipeline_epilogue", "comm/pp_backward_compressed_messages") == {1: 1, 2: 1}
    assert all(s > 0 for s in read_scalars(out / "tb_pipeline", "comm/pp_backward_compress_seconds").values())
    for rank in range(4):  # each stage-1 rank's LEP residual is in its checkpoint file
        state = load_file(out / "ckpt_pipeline" / "step-3" / "compression" / f"rank-{rank}.safetensors")
        residual = state.get("backprop/residual/hidden_states")
        if pipeline_job["ranks"][rank]["stage"] == 1:
            assert residual.shape == (128, 64) and float(residual.abs().max()) > 0
        else:
            assert residual is None


@pytest.mark.multiprocess
def test_changed_backprop_compression_on_resume_is_refused(pipeline_job):
    ckpt = pipeline_job["out"] / "ckpt_pipeline"
    run = [*TINY_RUN, "-p", "hybrid_parallel", "--pp", "2", "--compress_stages", "1", "--grad_compression", "powersgd",
           "--powersgd_warmup", "0", "--max_steps", "5", "-o", str(ckpt), "-f", str(ckpt / "step-3"), "-t", ""]  # fmt: skip
    before = sorted(ckpt.rglob("*"))
    proc = run_in_process("pretrain.py", [*run, "--compress_backprop", "2"], env={"WORLD_SIZE": "4"})
    expect_one_line_error(proc, "--compress_backprop 4 -> 2", "--reset_compression")
    proc = run_in_process("pretrain.py", run, env={"WORLD_SIZE": "4"})
    expect_one_line_error(proc, "--compress_backprop 4 -> None", "--reset_compression")
    assert sorted(ckpt.rglob("*")) == before
