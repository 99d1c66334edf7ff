"""benchmark.py reports real measurements, and its FLOPs formula matches an independent count."""

from __future__ import annotations

import json

import pytest
from conftest import check_ok, launch

from llama_recipe.metrics import training_flops_per_token
from llama_recipe.model import count_parameters, get_model_config


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
    # LLaMA-2 7B at 4096 tokens, by hand: 6,738,415,616 params - 131,072,000 input embedding - 266,240 norm
    # weights = 6,607,077,376 matmul weights; x6 = 39,642,464,256; + causal attention 6*32*4096*4096.
    assert training_flops_per_token(get_model_config("llama2-7b"), 4096) == 39_642_464_256 + 3_221_225_472


@pytest.fixture(scope="module")
def benchmark_rows(tmp_path_factory) -> dict[str, dict]:
    """benchmark.py under ddp and under -p none (plain PyTorch), 2 processes, one results file."""
    results = tmp_path_factory.mktemp("benchmark") / "new" / "results.jsonl"  # its folder is made
    for plugin in ("none", "ddp"):
        args = ["-c", "tiny", "-p", plugin, "-l", "128", "-b", "2", "--num_steps", "4", "--ignore_steps", "1"]
        args += ["--results", str(results)]
        proc = launch("benchmark.py", args, nproc=2)
        check_ok(proc)
        assert "MFU" in proc.stdout and "6*N_matmul" in proc.stdout
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
