"""Fast in-process checks of the pieces the training loop is built from: model presets and their
sizes, the optimizer's parameter groups and lr schedule, and the packed, resumable data stream."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import write_jsonl
from transformers import LlamaConfig

from llama_recipe.cli import parse_args
from llama_recipe.data import build_pretrain_batches
from llama_recipe.errors import UsageError
from llama_recipe.model import MODEL_PRESETS, build_model, count_parameters, get_model_config, model_config_names
from llama_recipe.optim import (
    FINAL_LR_FRACTION,
    LRSchedule,
    build_lr_scheduler,
    parameter_groups,
    warmup_cosine_factor,
)
from llama_recipe.sources import resolve_local_files

# ---------------------------------------------------------------------------------------------
# Model presets

# Published sizes (Hugging Face model cards / Meta's papers). LLaMA-1 7B/13B have the same shapes as LLaMA-2's.
KNOWN_SIZES = {
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "llama2-70b": 68_976_648_192,
    "llama-7b": 6_738_415_616,
    "llama-13b": 13_015_864_320,
    "llama-30b": 32_528_943_616,
    "llama-65b": 65_285_660_672,
}


# Meta's published sizes of Llama 3 (model cards, the Llama 3 paper), to the precision they give them.
LLAMA3_PUBLISHED = {
    "llama3-8b": (8.03e9, 0.01e9),
    "llama3.1-8b": (8.03e9, 0.01e9),
    "llama3-70b": (70.6e9, 0.1e9),
    "llama3.1-70b": (70.6e9, 0.1e9),
    "llama3.1-405b": (405.9e9, 0.1e9),  # "405B"; the model card's table says 405.9B
    "llama3.2-1b": (1.24e9, 0.01e9),
    "llama3.2-3b": (3.21e9, 0.01e9),
}


def _llama_size(hidden, layers, heads, kv_heads, ffn, vocab=32000, tied=False) -> int:
    """Parameter count written out independently of `count_parameters`."""
    head_dim = hidden // heads
    q_o = 2 * hidden * hidden
    k_v = 2 * hidden * kv_heads * head_dim
    swiglu = 3 * hidden * ffn
    norms = 2 * hidden
    return layers * (q_o + k_v + swiglu + norms) + (1 if tied else 2) * vocab * hidden + hidden


@pytest.mark.parametrize("name", list(KNOWN_SIZES))
def test_preset_has_its_published_parameter_count(name):
    assert count_parameters(get_model_config(name)) == KNOWN_SIZES[name]


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_count_parameters_equals_the_shape_written_out(name):
    """Every preset, the small ones too (whose sizes have no published figure), against the formula above."""
    c = get_model_config(name)
    shape = (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size)
    assert count_parameters(c) == _llama_size(*shape, vocab=c.vocab_size, tied=c.tie_word_embeddings)


@pytest.mark.parametrize("name", list(LLAMA3_PUBLISHED))
def test_llama3_preset_has_metas_published_size(name):
    published, precision = LLAMA3_PUBLISHED[name]
    assert abs(count_parameters(get_model_config(name)) - published) <= precision / 2, name


def test_llama3_presets_have_metas_shapes():
    """Vocabulary, GQA, RoPE and context as Meta ships them (transformers' convert_llama_weights_to_hf.py writes
    these fields; the rope_scaling values are the defaults its `_compute_llama3_parameters` documents)."""
    for name in LLAMA3_PUBLISHED:
        c = get_model_config(name)
        assert (c.vocab_size, c.num_key_value_heads, c.rope_theta, c.rms_norm_eps) == (128256, 8, 500000.0, 1e-5)
        assert c.max_position_embeddings == (8192 if name.startswith("llama3-") else 131072), name
        assert c.tie_word_embeddings == name.startswith("llama3.2"), name
        if not name.startswith("llama3-"):
            factor = 32.0 if name.startswith("llama3.2") else 8.0
            assert c.rope_scaling == dict(
                rope_type="llama3",
                factor=factor,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8192,
            ), name
    assert get_model_config("llama3.2-1b").head_dim == 64 and get_model_config("llama3.2-3b").head_dim == 128
    # Meta's FFN sizes from their params.json (dim, ffn_dim_multiplier, multiple_of), by transformers' rule
    for name, (dim, multiplier, multiple_of) in {
        "llama3-8b": (4096, 1.3, 1024),
        "llama3-70b": (8192, 1.3, 4096),
        "llama3.1-405b": (16384, 1.2, 4096),
        "llama3.2-1b": (2048, 1.5, 256),
        "llama3.2-3b": (3072, 1.0, 256),
    }.items():
        ffn = multiple_of * ((int(multiplier * int(8 * dim / 3)) + multiple_of - 1) // multiple_of)
        assert get_model_config(name).intermediate_size == ffn, name


def test_count_parameters_equals_a_tied_llama3_built_on_the_meta_device():
    """Llama 3.2 1B, built without memory: its parameters (the tied embedding counted once) are count_parameters'."""
    config = get_model_config("llama3.2-1b")
    with torch.device("meta"):
        model = build_model(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == count_parameters(config) == 1_235_814_400


@pytest.mark.parametrize(
    "alias, preset",
    [("7b", "llama2-7b"), ("13b", "llama2-13b"), ("70b", "llama2-70b"), ("30b", "llama-30b"), ("65b", "llama-65b")],
)
def test_aliases_map_to_the_reference_recipe_models(alias, preset):
    assert get_model_config(alias).to_dict() == get_model_config(preset).to_dict()
    assert count_parameters(get_model_config(alias)) == KNOWN_SIZES[preset]


def test_preset_shapes():
    c70 = get_model_config("llama2-70b")
    assert (c70.num_attention_heads, c70.num_key_value_heads) == (64, 8)
    assert get_model_config("llama-13b").intermediate_size == 13824
    assert get_model_config("llama-30b").intermediate_size == 17920
    for name in ["llama2-7b", "llama2-13b", "llama2-70b"]:
        config = get_model_config(name)
        assert config.rms_norm_eps == 1e-5 and config.max_position_embeddings == 4096, name
    for name in ["llama-7b", "llama-13b", "llama-30b", "llama-65b"]:
        config = get_model_config(name)
        assert config.rms_norm_eps == 1e-6 and config.max_position_embeddings == 2048, name
    for name in KNOWN_SIZES:
        config = get_model_config(name)
        assert config.vocab_size == 32000 and not config.tie_word_embeddings, name


def _built_size(config: LlamaConfig) -> int:
    return sum(p.numel() for p in build_model(config).parameters())


TINY_GQA = dict(
    model_type="llama",
    vocab_size=1000,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=176,
    max_position_embeddings=128,
)


def test_count_parameters_equals_a_built_tiny_model():
    config = get_model_config("tiny")
    assert count_parameters(config) == _built_size(get_model_config("tiny"))
    assert 4_000_000 < count_parameters(config) < 4_500_000  # "~4.2M" as the preset says


@pytest.mark.parametrize("extra", [{}, {"tie_word_embeddings": True}], ids=["untied", "tied"])
def test_count_parameters_equals_a_built_gqa_model_from_config_json(tmp_path, extra):
    (tmp_path / "config.json").write_text(json.dumps({**TINY_GQA, **extra}))
    config = get_model_config(str(tmp_path / "config.json"))
    assert config.num_key_value_heads == 2
    assert config.tie_word_embeddings == bool(extra)
    assert count_parameters(config) == _built_size(get_model_config(str(tmp_path / "config.json")))


@pytest.mark.parametrize("extra", [{"attention_bias": True}, {"mlp_bias": True}, {"head_dim": 32}])
def test_count_parameters_follows_optional_llama_config_fields(extra):
    config = LlamaConfig(**{k: v for k, v in TINY_GQA.items() if k != "model_type"}, **extra)
    assert count_parameters(config) == _built_size(config)


def test_model_config_from_file_and_from_directory(tmp_path):
    fields = {**TINY_GQA, "hidden_size": 96, "num_attention_heads": 6, "rms_norm_eps": 1e-6}
    (tmp_path / "config.json").write_text(json.dumps(fields))
    for source in [tmp_path / "config.json", tmp_path]:
        config = get_model_config(str(source))
        assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (96, 6, 2)
        assert config.rms_norm_eps == 1e-6 and config.vocab_size == 1000


def test_unknown_model_config_names_the_presets():
    with pytest.raises(UsageError) as info:
        get_model_config("llama4-8b")
    message = str(info.value)
    assert "llama4-8b" in message
    for name in model_config_names():
        assert name in message
    assert set(MODEL_PRESETS) | {"7b", "13b", "70b", "30b", "65b"} == set(model_config_names())


def test_model_config_rejects_bad_json_and_other_architectures(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        get_model_config(str(tmp_path / "broken.json"))
    (tmp_path / "gpt2.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(UsageError, match="gpt2"):
        get_model_config(str(tmp_path / "gpt2.json"))


# ---------------------------------------------------------------------------------------------
# Optimizer and schedule

WARMUP, TOTAL = 10, 50


def test_warmup_is_linear_and_reaches_the_peak():
    factors = [warmup_cosine_factor(step, WARMUP, TOTAL) for step in range(WARMUP)]
    assert factors == pytest.approx([(step + 1) / WARMUP for step in range(WARMUP)], abs=1e-12)
    assert factors[-1] == 1.0
    assert warmup_cosine_factor(WARMUP, WARMUP, TOTAL) == pytest.approx(1.0, abs=1e-12)


def test_cosine_decay_never_rises_and_stays_above_the_floor():
    decay = [warmup_cosine_factor(step, WARMUP, TOTAL) for step in range(WARMUP, TOTAL)]
    drops = [earlier - later for earlier, later in zip(decay[:-1], decay[1:], strict=True)]
    assert all(drop >= 0 for drop in drops), decay
    assert all(FINAL_LR_FRACTION - 1e-12 <= f <= 1.0 for f in decay)
    assert decay[0] == pytest.approx(1.0, abs=1e-12) and decay[-1] < 0.11  # from the peak nearly to the floor
    steepest = drops.index(max(drops))
    assert len(drops) / 3 < steepest < 2 * len(drops) / 3  # a cosine: flat at both ends, steepest mid-way
    assert max(drops[0], drops[-1]) < max(drops) / 4


@pytest.mark.parametrize("warmup, total", [(WARMUP, TOTAL), (0, 6), (2, 8)])
def test_last_update_uses_exactly_the_final_fraction(warmup, total):
    assert warmup_cosine_factor(total - 1, warmup, total) == pytest.approx(FINAL_LR_FRACTION, abs=1e-12)


def test_lr_scheduler_drives_torch_adamw_through_the_schedule():
    peak = 3e-4
    weight = torch.nn.Parameter(torch.ones(3, 3))
    optimizer = torch.optim.AdamW([weight], lr=peak)
    scheduler = build_lr_scheduler(optimizer, WARMUP, TOTAL)
    seen = []
    for _ in range(TOTAL):
        seen.append(optimizer.param_groups[0]["lr"])
        weight.grad = torch.ones_like(weight)
        optimizer.step()
        scheduler.step()
    expected = [peak * warmup_cosine_factor(step, WARMUP, TOTAL) for step in range(TOTAL)]
    assert seen == expected  # bit for bit: LambdaLR multiplies the peak by the factor, nothing else
    assert seen[0] == pytest.approx(peak / WARMUP) and max(seen) == pytest.approx(peak)
    assert not torch.equal(weight.detach(), torch.ones(3, 3))  # the optimizer really stepped


def test_the_default_schedule_is_the_warmup_cosine_bit_for_bit():
    """--lr_schedule's default, in both training scripts, gives warmup_cosine_factor's values exactly
    (for 17,000 (step, warmup, total), short runs and warmups longer than the run included)."""
    grid = [
        (step, warmup, total)
        for total in range(1, 60)
        for warmup in (0, 1, 3, total, total + 5)
        for step in range(total + 1)
    ]
    grid += [(step, 2000, 5000) for step in range(0, 5000, 7)]
    for argv in ([], ["--model_path", "some-model"]):  # pretrain.py's flags, finetune.py's
        opt = parse_args("finetune" if argv else "pretrain", argv).optim
        for step, warmup, total in grid:
            assert LRSchedule.of(opt, warmup, total).factor(step) == warmup_cosine_factor(step, warmup, total)


# WSD pinned to its formula, by hand: 2 warmup, 4 stable and 4 decay updates (--decay_fraction 0.4 of 10);
# the decay's progress is 1/4, 2/4, 3/4, 1 on updates 6-9, and factor = 0.1 + 0.9 * shape(progress).
WSD_WARMUP_AND_STABLE = [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]
WSD_DECAYS = {
    "linear": [0.1 + 0.9 * 0.75, 0.1 + 0.9 * 0.5, 0.1 + 0.9 * 0.25, 0.1],
    "cosine": [0.1 + 0.9 * (0.5 + 0.5 * 0.5**0.5), 0.1 + 0.9 * 0.5, 0.1 + 0.9 * (0.5 - 0.5 * 0.5**0.5), 0.1],
    "1-sqrt": [0.1 + 0.9 * 0.5, 0.1 + 0.9 * (1 - 0.5**0.5), 0.1 + 0.9 * (1 - 0.75**0.5), 0.1],
}


@pytest.mark.parametrize("shape", WSD_DECAYS)
def test_wsd_warms_up_holds_the_peak_then_decays_to_the_floor_at_the_last_update(shape):
    schedule = LRSchedule("wsd", 2, 10, 0.4, shape)
    factors = [schedule.factor(step) for step in range(10)]
    assert factors == pytest.approx(WSD_WARMUP_AND_STABLE + WSD_DECAYS[shape], abs=1e-12)
    assert schedule.describe() == f"wsd: 2 warmup, 4 stable, 4 decay ({shape}) to 10% of --lr"


def test_wsd_decay_steps_round_to_the_nearest_and_fit_exactly():
    # 0.28 * 25 is 7.000000000000001 in floating point: 7 decay updates (18 to 24), not 8
    schedule = LRSchedule("wsd", 0, 25, 0.28, "linear")
    assert [schedule.factor(step) for step in (17, 18, 24)] == pytest.approx([1.0, 0.1 + 0.9 * 6 / 7, 0.1], abs=1e-12)
    whole = LRSchedule("wsd", 0, 4, 1.0, "linear")  # --decay_fraction 1 without warmup: it decays from the first update
    assert [whole.factor(step) for step in range(4)] == pytest.approx([0.775, 0.55, 0.325, 0.1], abs=1e-12)
    assert LRSchedule("wsd", 3, 10, 0.7, "linear").problem() is None  # warmup + decay = the run: no stable phase
    assert "do not fit in the run's 10 steps" in LRSchedule("wsd", 4, 10, 0.7, "linear").problem()
    with pytest.raises(UsageError, match="4 warmup steps and 7 decay steps"):
        LRSchedule.of(parse_args("pretrain", ["--lr_schedule", "wsd", "--decay_fraction", "0.7"]).optim, 4, 10)


def test_constant_warms_up_then_holds_the_peak():
    schedule = LRSchedule("constant", 4, 10)
    assert [schedule.factor(step) for step in range(10)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]


def test_weight_decay_only_on_matrices():
    torch.manual_seed(0)
    model = build_model(get_model_config("tiny"))
    decay, no_decay = parameter_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["params"] and all(p.ndim == 2 for p in decay["params"])
    assert no_decay["params"] and all(p.ndim == 1 for p in no_decay["params"])

    grouped = [id(p) for p in decay["params"] + no_decay["params"]]
    assert len(grouped) == len(set(grouped))  # nobody twice
    assert set(grouped) == {id(p) for p in model.parameters()}  # nobody left out
    norms = {id(p) for name, p in model.named_parameters() if "norm" in name}
    assert norms == {id(p) for p in no_decay["params"]}
    assert len(norms) == 2 * model.config.num_hidden_layers + 1  # two per layer plus the final norm

    optimizer = torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-3)  # groups torch accepts as they are
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]


def test_adam_eps_defaults_to_llama2s_for_pretraining_and_reaches_the_optimizers():
    """--adam_eps: Llama 2's 1e-5 for pretraining (and benchmarks), 1e-8 for finetuning, in every
    Adam variant build_optimizer makes (hybrid_adam takes it the same way; not built here: on CPU its
    kernel compiles for minutes). Changing it on resume is refused unless --reset_optimizer."""
    from llama_recipe.cli import parse_args
    from llama_recipe.config import TrainConfig, range_problems
    from llama_recipe.optim import build_optimizer
    from llama_recipe.validation import resume_differences

    defaults = {
        script: TrainConfig.for_script(script).optim.adam_eps for script in ("pretrain", "benchmark", "finetune")
    }
    assert defaults == {"pretrain": 1e-5, "benchmark": 1e-5, "finetune": 1e-8}
    assert parse_args("pretrain", ["--adam_eps", "1e-6"]).optim.adam_eps == 1e-6
    assert range_problems(parse_args("pretrain", ["--adam_eps", "0"])) == ["--adam_eps must be above 0, got 0"]

    for name, dtype in [("adamw", torch.float32), ("collage_light", torch.bfloat16), ("collage_plus", torch.bfloat16)]:
        model = torch.nn.Linear(4, 4).to(dtype)
        optimizer = build_optimizer(name, model, lr=1e-3, weight_decay=0.1, eps=1e-3)
        assert [group["eps"] for group in optimizer.param_groups] == [1e-3, 1e-3], name

    saved, current = {"adam_eps": 1e-8}, {"adam_eps": 1e-5, "reset_optimizer": False}
    assert resume_differences(saved, current) == ["--adam_eps 1e-08 -> 1e-05 (pass --reset_optimizer to accept)"]
    assert resume_differences(saved, current | {"reset_optimizer": True}) == []


def test_muon_takes_the_hidden_matrices_with_adamws_update_size_and_half_its_state():
    """--optimizer muon: Muon for the attention and MLP projections, AdamW for the embeddings, the output layer
    and the norms, each with --weight_decay where AdamW alone decays. "match_rms_adamw" scales the orthogonalised
    update to an RMS of about 0.2 * lr, whatever the matrix's shape: 0.2 * sqrt(max(rows, cols)) times the RMS of
    a semi-orthogonal matrix, 1 / sqrt(max(rows, cols)), a little less as Newton-Schulz leaves singular values
    around, not at, 1. Keller Jordan's "original" scaling gives these 64x64 and 176x64 matrices 0.10 to 0.11 * lr."""
    from llama_recipe.optim import build_optimizer

    torch.manual_seed(0)
    model = build_model(get_model_config("tiny"))
    optimizer = build_optimizer("muon", model, lr=1e-3, weight_decay=0.0)
    by_name = {id(p): name for name, p in model.named_parameters()}
    muon = {by_name[id(p)] for g in optimizer.param_groups if g["muon"] for p in g["params"]}
    assert muon == {name for name in by_name.values() if "proj" in name}  # q, k, v, o, gate, up, down: 7 per layer
    assert len(muon) == 7 * model.config.num_hidden_layers
    grouped = [(g["muon"], g["weight_decay"], len(g["params"])) for g in optimizer.param_groups]
    assert grouped == [(True, 0.0, len(muon)), (False, 0.0, 2), (False, 0.0, 2 * model.config.num_hidden_layers + 1)]

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = torch.randint(0, model.config.vocab_size, (2, 32))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    for name, p in model.named_parameters():
        if name in muon:
            rms = (p.detach() - before[name]).pow(2).mean().sqrt().item()
            assert 0.15e-3 < rms < 0.21e-3, (name, tuple(p.shape), rms)  # measured: 0.16e-3 to 0.18e-3
    # its state: one fp32 momentum buffer per hidden matrix, AdamW's two moments and step count for the rest
    from llama_recipe.memory import bytes_by_role

    hidden = sum(p.numel() for name, p in model.named_parameters() if name in muon)
    rest = [p for name, p in model.named_parameters() if name not in muon]
    expected = 4 * hidden + sum(8 * p.numel() + 4 for p in rest)
    assert bytes_by_role(model, optimizer)["optimizer"] == expected


# ---------------------------------------------------------------------------------------------
# Data

DOCUMENTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Packing joins documents; each one ends with EOS.",
    "Ünïcödé and numbers 12345 tokenize too.",
    "A",
    "Multi-line\ndocument with\ttabs and    spaces.",
    "def f(x):\n    return x * 2  # code is text as well",
    "Short one.",
    "The last document of the corpus, a little longer than the others so rows straddle it.",
]


def _stream(tokenizer, texts) -> list[int]:
    out = []
    for text in texts:
        out += tokenizer(text).input_ids + [tokenizer.eos_token_id]
    return out


def _rows(batches, n) -> list[list[int]]:
    return [row for _ in range(n) for row in batches.next_batch()["input_ids"].tolist()]


def test_rows_are_full_and_labels_equal_inputs(tmp_path, tokenizer):
    write_jsonl(tmp_path / "a.jsonl", DOCUMENTS)
    batches = build_pretrain_batches(str(tmp_path / "a.jsonl"), tokenizer, 24, 3, 0, 1)
    for _ in range(8):  # several epochs of this small corpus
        batch = batches.next_batch()
        assert batch["input_ids"].shape == (3, 24) and batch["input_ids"].dtype == torch.long
        assert torch.equal(batch["labels"], batch["input_ids"])
    assert batches.epoch >= 1


def test_first_epoch_is_the_concatenated_documents_and_the_tail_waits(tmp_path, tokenizer):
    for i in range(4):
        write_jsonl(tmp_path / f"part-{i}.jsonl", DOCUMENTS[i * 2 : i * 2 + 2])
    stream = _stream(tokenizer, DOCUMENTS)
    assert tokenizer.bos_token_id == stream[0] and stream[-1] == tokenizer.eos_token_id
    seq_len = 13
    full_rows = len(stream) // seq_len
    tail = len(stream) - full_rows * seq_len
    assert tail > 0, "pick seq_len so the epoch leaves a tail"

    batches = build_pretrain_batches(str(tmp_path / "part-*.jsonl"), tokenizer, seq_len, 1, 0, 1)
    rows = _rows(batches, full_rows)
    assert all(len(row) == seq_len for row in rows)
    assert [t for row in rows for t in row] == stream[: full_rows * seq_len]
    assert batches.epoch == 0

    straddling = _rows(batches, 1)[0]  # the tail of epoch 0, then the start of epoch 1
    assert straddling[:tail] == stream[-tail:]
    assert straddling[tail] == tokenizer.bos_token_id
    assert batches.epoch == 1


def test_epochs_follow_each_other_without_losing_a_token(tmp_path, tokenizer):
    write_jsonl(tmp_path / "one.jsonl", DOCUMENTS)
    stream = _stream(tokenizer, DOCUMENTS)
    seq_len, batch_size = 17, 2
    batches = build_pretrain_batches(str(tmp_path / "one.jsonl"), tokenizer, seq_len, batch_size, 0, 1)
    n_batches = math.ceil(2.5 * len(stream) / (seq_len * batch_size))
    flat = [t for row in _rows(batches, n_batches) for t in row]
    assert flat == (stream * 3)[: len(flat)]
    assert batches.epoch == 2


def _equal_length_corpus(tmp_path, tokenizer, n_files=4, per_file=3):
    """Documents that all tokenize to the same length, so `seq_len` = one document per row."""
    texts = []
    for f in range(n_files):
        file_texts = [f"File {f} document {i}: the quick brown fox." for i in range(per_file)]
        write_jsonl(tmp_path / f"part-{f}.jsonl", file_texts)
        texts += file_texts
    docs = [tokenizer(t).input_ids + [tokenizer.eos_token_id] for t in texts]
    assert len({len(d) for d in docs}) == 1 and len({tuple(d) for d in docs}) == len(docs)
    return texts, docs, len(docs[0])


def test_data_parallel_ranks_read_disjoint_parts_that_cover_the_stream(tmp_path, tokenizer):
    texts, docs, doc_len = _equal_length_corpus(tmp_path, tokenizer)
    per_rank = len(docs) // 2
    ranks = []
    for dp_rank in range(2):
        batches = build_pretrain_batches(str(tmp_path), tokenizer, doc_len, 1, dp_rank, 2)
        rows = _rows(batches, per_rank)
        assert batches.epoch == 0 and batches.state_dict()["leftover"] == []
        ranks.append([tuple(row) for row in rows])
    assert not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == sorted(tuple(d) for d in docs)
    assert ranks[0] != ranks[1]


def _resumed(dataset, tokenizer, seq_len, batch_size, k, n):
    """Take k batches, checkpoint the position through JSON, and read n more batches in a new stream."""
    first = build_pretrain_batches(dataset, tokenizer, seq_len, batch_size, 0, 1)
    _rows(first, k)
    state = json.loads(json.dumps(first.state_dict()))
    second = build_pretrain_batches(dataset, tokenizer, seq_len, batch_size, 0, 1)
    second.load_state_dict(state)
    return state, _rows(second, n)


RESUME_SEQ, RESUME_BATCH, RESUME_AFTER = 16, 2, 4


@pytest.fixture(scope="module")
def resume_corpus(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("resume")
    write_jsonl(root / "a.jsonl", DOCUMENTS[:5])
    write_jsonl(root / "b.jsonl", DOCUMENTS[5:])
    batches_per_epoch = len(_stream(tokenizer, DOCUMENTS)) / (RESUME_SEQ * RESUME_BATCH)
    assert 3 < batches_per_epoch < 6  # epochs wrap within ~10 batches
    reference = build_pretrain_batches(str(root), tokenizer, RESUME_SEQ, RESUME_BATCH, 0, 1)
    return str(root), len(_stream(tokenizer, DOCUMENTS)), _rows(reference, 14)


@pytest.mark.parametrize("k", [1, 3, 4, 6, 9])
def test_resume_continues_exactly_where_the_stream_stopped(resume_corpus, tokenizer, k):
    dataset, epoch_tokens, reference = resume_corpus
    state, rows = _resumed(dataset, tokenizer, RESUME_SEQ, RESUME_BATCH, k, RESUME_AFTER)
    assert rows == reference[k * RESUME_BATCH : (k + RESUME_AFTER) * RESUME_BATCH]
    # the checkpoint sits in the epoch of the last token handed out: k = 1, 3 before the boundary, 6, 9 after
    assert state["epoch"] == (k * RESUME_BATCH * RESUME_SEQ - 1) // epoch_tokens


def test_resume_exactly_at_the_end_of_an_epoch(tmp_path, tokenizer):
    _, docs, doc_len = _equal_length_corpus(tmp_path, tokenizer, n_files=2)
    reference = _rows(build_pretrain_batches(str(tmp_path), tokenizer, doc_len, 1, 0, 1), len(docs) + 2)
    state, rows = _resumed(str(tmp_path), tokenizer, doc_len, 1, len(docs), 2)
    assert state["leftover"] == [] and state["epoch"] == 0  # every document of epoch 0 went into full rows
    assert rows == reference[len(docs) :]


def test_resolve_local_files(tmp_path):
    (tmp_path / "sub").mkdir()
    a = write_jsonl(tmp_path / "a.jsonl", ["x"])
    b = write_jsonl(tmp_path / "sub" / "b.jsonl", ["y"])
    gz = tmp_path / "c.json.gz"
    gz.write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not data")

    assert resolve_local_files(str(a)) == [str(a)]
    assert resolve_local_files(str(tmp_path)) == sorted([str(a), str(b), str(gz)])
    assert resolve_local_files(str(tmp_path / "*.jsonl")) == [str(a)]
    assert resolve_local_files(str(tmp_path / "**" / "*.jsonl")) == sorted([str(a), str(b)])
    with pytest.raises(UsageError, match="matches no"):
        resolve_local_files(str(tmp_path / "*.parquet"))
    with pytest.raises(UsageError, match="missing.jsonl does not exist"):
        resolve_local_files(str(tmp_path / "sub" / "missing.jsonl"))
    (tmp_path / "d.parquet").write_bytes(b"")
    with pytest.raises(UsageError, match="mixes Parquet and JSON"):
        resolve_local_files(str(tmp_path))


def test_the_tensorboard_writer_is_made_at_the_first_write(tmp_path):
    """A run refused before its first scalar leaves no event file behind (the writer is made lazily)."""
    from llama_recipe.metrics import MetricsLogger, read_scalars

    logger = MetricsLogger(True, str(tmp_path / "tb"), total_steps=2, start_step=0, desc="test")
    assert not (tmp_path / "tb").exists()
    logger.log_scalars(1, {"eval/loss": 2.5})
    logger.close()
    assert read_scalars(tmp_path / "tb", "eval/loss") == {1: 2.5}


def test_a_resumed_runs_loss_curve_is_the_whole_run_each_step_once(tmp_path):
    """loss.png after a resume: the steps up to the checkpoint, read back from the event files (a
    stretch trained twice as last logged, steps past the checkpoint left out), then this run's steps
    (a rollback's second pass over a step drawn once)."""
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    from llama_recipe.metrics import earlier_losses, plot_loss_curve

    tb = tmp_path / "tb"
    with SummaryWriter(tb) as first:  # steps 1-6, then a crash; the next run resumed from step 2 ...
        for step in range(1, 7):
            first.add_scalar("train/loss", float(step), step)
    with SummaryWriter(tb) as second:  # ... trained steps 3-4 again, saved step 4 and stopped at step 5
        for step in (3, 4, 5):
            second.add_scalar("train/loss", 10.0 * step, step)
    earlier = earlier_losses(str(tb), 4)  # the run resuming from step 4
    assert earlier == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert earlier_losses(str(tmp_path / "never-written"), 4) == [] and earlier_losses(None, 4) == []
    png = plot_loss_curve([*earlier, (5, 5.5), (6, 6.5), (5, 5.0), (6, 6.0)], str(tmp_path / "loss.png"))
    assert Image.open(png).text["Description"] == "training loss at 6 steps, 1 to 6"
