"""benchmark.py reports real measurements, and its FLOPs formula matches an independent count."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import check_ok, launch

from llama_recipe.metrics import (
    GEMM_REACHABLE_FRACTION,
    GPU_PEAK_TFLOPS,
    data_sheet_peak,
    describe_probe,
    model_flops_utilization,
    training_flops_per_token,
)
from llama_recipe.model import build_model, count_parameters, get_model_config


def test_flops_formula_against_parameter_count():
    """6 FLOPs per matmul weight per token (fwd + bwd) plus causal attention, for dense MHA and for GQA."""
    for name, seq_len in [("llama2-7b", 4096), ("llama2-70b", 4096), ("tiny", 128)]:
        config = get_model_config(name)
        h, layers, v = config.hidden_size, config.num_hidden_layers, config.vocab_size
        norms = (2 * layers + 1) * h
        input_embedding = v * h
        matmul_weights = count_parameters(config) - norms - input_embedding  # everything that multiplies
        expected = 6 * matmul_weights + 6 * layers * seq_len * h
        assert training_flops_per_token(config, seq_len) == expected
        assert training_flops_per_token(config, seq_len, causal=False) == expected + 6 * layers * seq_len * h
    # LLaMA-2 7B at 4096 tokens, by hand: 6,738,415,616 params - 131,072,000 input embedding - 266,240 norm
    # weights = 6,607,077,376 matmul weights; x6 = 39,642,464,256; + causal attention 6*32*4096*4096.
    llama2_7b = get_model_config("llama2-7b")
    assert training_flops_per_token(llama2_7b, 4096) == 39_642_464_256 + 3_221_225_472
    # The figures: our causal MFU reads 7% lower than the full-attention count of PaLM, nanoGPT
    # and torchtitan for llama2-7b at 4,096 tokens (6.99%), and 14% lower for `small` at 2,048 (14.25%).
    for name, seq_len, lower in [("llama2-7b", 4096, 0.0699), ("small", 2048, 0.1425)]:
        config = get_model_config(name)
        ratio = training_flops_per_token(config, seq_len) / training_flops_per_token(config, seq_len, causal=False)
        assert 1 - ratio == pytest.approx(lower, abs=5e-5)


@pytest.mark.parametrize("kv_heads", [4, 2])  # tiny's 4 heads, and GQA: 2 key/value heads for 4 query heads
def test_flops_formula_against_torch_flop_counter(kv_heads):
    """torch's FlopCounterMode, counting one forward and backward of `tiny`, agrees with the formula.

    FlopCounterMode counts matrix products only (mm, bmm, SDPA's kernels), as the formula does: norms,
    SiLU, softmax, the rotary rotation and the loss are elementwise, in neither. It counts attention's
    S x S products whole, ignoring the causal mask, so it is held against the full-attention count
    (12*L*S*H). Eager attention, because on CPU SDPA runs a kernel FlopCounterMode has no formula for
    (it counts it as 0; on GPU its SDPA formula counts the same 12*L*S*H). Tolerances: the weights'
    products (mm) exactly; attention (bmm) to 1e-3, because the rotary embedding's frequency table is
    a bmm too (inv_freq @ positions, 2 * head_dim/2 * S FLOPs forward, no backward: 1,024 here, 8e-5
    of attention's), which the formula leaves out as it leaves out other positional arithmetic."""
    from torch.utils.flop_counter import FlopCounterMode

    config = get_model_config("tiny")
    config.num_key_value_heads = kv_heads
    batch, seq_len = 2, 64
    tokens = batch * seq_len
    torch.manual_seed(0)
    model = build_model(config, attn_implementation="eager")
    input_ids = torch.randint(0, config.vocab_size, (batch, seq_len))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=input_ids, labels=input_ids).loss.backward()
    counted = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    assert set(counted) == {"aten.mm", "aten.bmm"}
    full_attention = 12 * config.num_hidden_layers * seq_len * config.hidden_size * tokens
    causal = training_flops_per_token(config, seq_len) * tokens
    assert counted["aten.mm"] == causal - full_attention // 2  # 6 * N_matmul * tokens
    assert counted["aten.bmm"] == pytest.approx(full_attention, rel=1e-3)
    assert counter.get_total_flops() == pytest.approx(training_flops_per_token(config, seq_len, causal=False) * tokens)


def test_peaks_come_from_exact_device_names():
    """Each part its own data-sheet figure; a name the table does not hold (a MIG slice, another GPU)
    gets no peak, hence no MFU, and says how to give one."""
    names = {  # torch.cuda.get_device_name() -> dense bf16 TFLOP/s
        "NVIDIA H100 80GB HBM3": 989.4,  # SXM
        "NVIDIA H100 PCIe": 756.0,
        "NVIDIA H100 NVL": 835.0,
        "NVIDIA H200": 989.4,
        "NVIDIA A100-SXM4-80GB": 312.0,
        "NVIDIA A100-PCIE-40GB": 312.0,
        "NVIDIA A100 80GB PCIe": 312.0,
        "NVIDIA L40S": 362.05,
        "NVIDIA B200": 2250.0,
        "AMD Instinct MI300X": 1307.4,
    }
    for name, tflops in names.items():
        peak, source = data_sheet_peak(name)
        assert peak == pytest.approx(tflops * 1e12) and GPU_PEAK_TFLOPS[name][0] in source
    assert "H100 PCIe" in data_sheet_peak("NVIDIA H100 PCIe")[1]
    for unknown in ("NVIDIA H100 80GB HBM3 MIG 3g.40gb", "NVIDIA GeForce RTX 4090", "NVIDIA H100"):
        peak, source = data_sheet_peak(unknown)
        assert peak is None and "--peak_tflops" in source and "\n" not in source
        assert model_flops_utilization(1e4, 1e9, 1, peak) is None


def test_gemm_probe_warns_when_the_data_sheet_does_not_fit():
    """A probe at the share of the peak a GEMM reaches is quiet; an H100 PCIe's probe held against
    the SXM part's figure (what substring matching gave it) warns, in one line."""
    sxm, pcie = data_sheet_peak("NVIDIA H100 80GB HBM3")[0], data_sheet_peak("NVIDIA H100 PCIe")[0]
    assert not describe_probe(GEMM_REACHABLE_FRACTION * sxm, sxm).startswith("warning")
    assert not describe_probe(GEMM_REACHABLE_FRACTION * pcie, pcie).startswith("warning")
    warning = describe_probe(GEMM_REACHABLE_FRACTION * pcie, sxm)
    assert warning.startswith("warning") and "--peak_tflops" in warning and "\n" not in warning


@pytest.fixture(scope="module")
def benchmark_rows(tmp_path_factory) -> dict[str, dict]:
    """benchmark.py under ddp and under -p none (plain PyTorch), 2 processes, one results file."""
    results = tmp_path_factory.mktemp("benchmark") / "new" / "results.jsonl"  # its folder is made
    for plugin in ("none", "ddp"):
        args = ["-c", "tiny", "-p", plugin, "-l", "128", "-b", "2", "--num_steps", "4", "--ignore_steps", "1"]
        args += ["--results", str(results)]
        proc = launch("benchmark.py", args, nproc=2)
        check_ok(proc)
        assert "MFU" in proc.stdout and "6*N_matmul + 6*L*S*H" in proc.stdout and "6*N_matmul + 12*L*S*H" in proc.stdout
        assert "attention counted whole" in proc.stdout
        assert "-o/" not in proc.stdout and "checkpoint: none\n" in proc.stdout  # it has no -o to name
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    return {row["plugin"]: row for row in rows}


@pytest.mark.multiprocess
def test_benchmark_reports_a_results_line(benchmark_rows):
    row = benchmark_rows["ddp"]
    assert row["plugin"] == "ddp" and row["world_size"] == 2 and row["dp_size"] == 2 and row["seq_len"] == 128
    assert len(row["losses"]) == 4  # --num_steps 4
    assert row["tokens_per_s"] == pytest.approx(2 * 2 * 128 / row["step_s_median"])  # 2 replicas x 2 x 128 tokens
    assert row["tgs"] == pytest.approx(row["tokens_per_s"] / 2)
    flops = training_flops_per_token(get_model_config("tiny"), 128)
    assert row["tflops_per_device"] == pytest.approx(flops * row["tgs"] / 1e12)
    assert 0 < row["mfu"] < 1 and row["peak_memory_mb"] > 100
    full = training_flops_per_token(get_model_config("tiny"), 128, causal=False)
    assert row["mfu_full_attention"] == pytest.approx(row["mfu"] * full / flops)  # the same run, counted whole
    parts = row["step_parts_s"]
    assert set(parts) == {"data", "forward_backward", "optimizer", "other"} and min(parts.values()) >= 0
    assert parts["forward_backward"] == max(parts.values())  # the model's own work dominates a step
    assert 0 <= row["outside_model_fraction"] < 0.5


@pytest.mark.multiprocess
def test_plain_pytorch_baseline_matches_ddp(benchmark_rows):
    """`-p none` is the loop without ColossalAI; on the same batches it must give ddp's losses."""
    assert benchmark_rows["none"]["losses"] == pytest.approx(benchmark_rows["ddp"]["losses"], abs=1e-6)


def test_benchmark_flags_mean_what_they_mean_in_pretrain(capsys):
    """benchmark.py shares pretrain.py's parser and keeps the ColossalAI benchmark's spellings that
    pretrain.py does not use for another flag; its -s/-i/-w are long names here."""
    from llama_recipe.cli import parse_args

    own = ["--num_steps", "7", "--ignore_steps", "3", "--gemini_warmup_ratio", "0.5"]
    cfg = parse_args("benchmark", [*own, "--mbs", "2", "--zero", "1", "-p", "none"])
    assert (cfg.training.max_steps, cfg.logging.ignore_steps, cfg.parallel.gemini_warmup_ratio) == (7, 3, 0.5)
    assert (cfg.parallel.microbatch_size, cfg.parallel.zero_stage, cfg.parallel.plugin) == (2, 1, "none")
    assert cfg.data.dataset == "synthetic" and cfg.optim.warmup_steps == 0 and cfg.checkpoint.save_dir == ""
    pretrain = parse_args("pretrain", ["-s", "7", "-i", "3", "-w", "0.5"])
    assert (pretrain.optim.warmup_steps, pretrain.checkpoint.save_interval, pretrain.optim.weight_decay) == (7, 3, 0.5)
    for spelling in ("-s", "-i", "-w", "--warmup_ratio"):
        with pytest.raises(SystemExit):
            parse_args("benchmark", [spelling, "1"])
        assert f"unrecognized arguments: {spelling} 1" in capsys.readouterr().err
