"""Bad input to `pretrain.py` is reported as one line naming the problem and the fix, with exit code 2,
before anything is written or any process group starts.

Each case starts from a valid command line and breaks one thing. The cases run through the scripts'
own entry point (`cli.run_script`) in this process, which is where every check lives; two of them
also run as real processes, for what only a process shows (nothing else on stderr, the exit code).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from conftest import (
    DATA,
    HELD_OUT,
    INSTRUCT_DATA,
    TOKENIZER,
    expect_error_after_training,
    expect_one_line_error,
    launch,
    run_in_process,
    write_jsonl,
)

from llama_recipe.cli import parse_args
from llama_recipe.errors import UsageError
from llama_recipe.plugins import CPU_PLUGINS, PLUGIN_NAMES
from llama_recipe.validation import validate

VALID = ["-c", "tiny", "-p", "zero2", "-d", str(DATA), "-l", "128", "-b", "2", "--max_steps", "2"]

# case: (arguments added after VALID (later flags win), extra environment, words the message must contain).
# "{tmp}" is replaced by the case's own temporary directory.
CASES = {
    "unknown_plugin": (["-p", "nonsense"], {}, ["nonsense", "-p", *PLUGIN_NAMES]),
    "missing_dataset": (["-d", "/nonexistent/data.jsonl"], {}, ["/nonexistent/data.jsonl", "pass -d"]),
    "empty_glob": (["-d", "{tmp}/nothing-*.jsonl"], {}, ["nothing-*.jsonl", "matches no", "pass -d"]),
    "max_length_above_positions": (["-c", "tiny", "-l", "100000"], {}, ["100000", "1024", "-l"]),
    "missing_checkpoint": (["-f", "/nonexistent/ckpt"], {}, ["/nonexistent/ckpt", "does not exist", "-f"]),
    "incomplete_checkpoint": (["-f", "{tmp}/step-3"], {}, ["step-3", "running_states.json", "-f"]),
    "gemini_on_cpu": (["-p", "gemini"], {}, ["gemini", "CUDA", *CPU_PLUGINS]),
    "gemini_auto_on_cpu": (["-p", "gemini_auto"], {}, ["gemini_auto", "CUDA", *CPU_PLUGINS]),
    "world_size_not_divisible": (
        ["-p", "hybrid_parallel", "--tp", "2"],
        {"WORLD_SIZE": "3"},
        ["world size 3", "tp*pp", "--tp"],
    ),
    "tp_without_hybrid_parallel": (["--tp", "2", "-p", "zero2"], {}, ["--tp", "hybrid_parallel", "zero2"]),
    "zero_tp": (["--tp", "0", "-p", "hybrid_parallel"], {}, ["--tp", "at least 1", "got 0"]),
    "zero_in_hybrid_parallel_fp32": (
        ["-p", "hybrid_parallel", "--zero_stage", "1", "-x", "fp32"],
        {},
        ["--zero_stage", "fp32", "bf16"],
    ),
    "unknown_model_config": (["-c", "nonsense"], {}, ["nonsense", "tiny", "llama2-7b", "70b", "config.json"]),
    "zero_batch_size": (["-b", "0"], {}, ["-b/--batch_size", "at least 1", "got 0"]),
    "non_integer_batch_size": (["-b", "two"], {}, ["-b/--batch_size", "'two'", "int"]),
    "zero_microbatch_size": (["--microbatch_size", "0"], {}, ["--microbatch_size", "at least 1", "got 0"]),
    "nan_learning_rate": (["--lr", "nan"], {}, ["--lr", "above 0", "nan"]),
    "infinite_learning_rate": (["--lr", "inf"], {}, ["--lr", "finite", "inf"]),
    "infinite_dist_timeout": (["--dist_timeout", "1e999"], {}, ["--dist_timeout", "finite", "inf"]),
    "zero_max_steps": (["--max_steps", "0"], {}, ["--max_steps", "at least 1", "got 0"]),
    "negative_grad_clip": (["--grad_clip", "-1"], {}, ["--grad_clip", "at least 0", "got -1"]),
    "negative_seed": (["--seed", "-1"], {}, ["--seed", "at least 0", "got -1"]),
    # sizing epochs of a hub stream would read all of it first
    "hub_stream_without_max_steps": (  # (this case drops VALID's --max_steps)
        ["-d", "someorg/some-corpus", "-e", "1"],
        {},
        ["someorg/some-corpus", "--max_steps", "prepare_data.py"],
    ),
    # Collage and in-place SGD only work where no fp32 master copy / whole gradients are guaranteed
    "collage_with_gemini": (["-p", "gemini", "--optimizer", "collage_plus"], {}, ["gemini", "fp32", "zero2"]),
    "collage_with_mixed_precision": (
        ["--optimizer", "collage_light", "-x", "bf16"],
        {},
        ["collage_light", "master weights", "-x bf16", "pure_bf16"],
    ),
    "pure_bf16_with_hybrid_zero": (
        ["-p", "hybrid_parallel", "-x", "pure_bf16", "--zero_stage", "1"],
        {},
        ["pure_bf16", "--zero_stage 0", "zero2"],
    ),
    "inplace_sgd_with_zero": (["--optimizer", "inplace_sgd", "-p", "zero2"], {}, ["inplace_sgd", "-p ddp", "zero2"]),
    "inplace_sgd_with_accumulation": (
        ["--optimizer", "inplace_sgd", "-p", "ddp", "--accumulation_steps", "2"],
        {},
        ["inplace_sgd", "--accumulation_steps"],
    ),
    # Muon orthogonalises whole matrices: refused where the optimizer sees shards of them
    "muon_with_zero": (["--optimizer", "muon"], {}, ["muon", "zero2", "-p ddp", "--tp 1"]),
    "muon_with_tensor_parallel": (
        ["--optimizer", "muon", "-p", "hybrid_parallel", "--tp", "2"],
        {"WORLD_SIZE": "2"},
        ["muon", "--tp > 1", "--pp", "-p ddp"],
    ),
    "edq_without_collage": (["--log_edq"], {}, ["--log_edq", "collage_light"]),
    "beta2_out_of_range": (["--beta2", "1.5"], {}, ["--beta2", "1.5"]),
    "document_attention_with_hybrid_parallel": (
        ["--document_attention", "-p", "hybrid_parallel"],
        {},
        ["--document_attention", "hybrid_parallel", "zero2"],
    ),
    "fp16_ddp_on_cpu": (["-p", "ddp", "-x", "fp16"], {}, ["-x fp16", "-p ddp", "CUDA", "-x bf16"]),
    "zero_max_length": (["-l", "0"], {}, ["-l/--max_length", "at least 2", "got 0"]),
    "negative_weight_decay": (["-w", "-0.1"], {}, ["-w/--weight_decay", "at least 0"]),
    "tp_zero_with_zero2": (["--tp", "0"], {}, ["--tp", "at least 1"]),
    "nan_mixture_weight": (["--data_mix", "arxiv=nan,book=1"], {}, ["--data_mix", "weights must be"]),
    "missing_tokenizer_dir": (["--tokenizer", "/nonexistent/tok"], {}, ["/nonexistent/tok", "--tokenizer"]),
    "output_under_a_file": (["-o", "{tmp}/file/ckpt"], {}, ["-o/--save_dir", "is a file"]),
    "tensorboard_under_a_file": (["-t", "{tmp}/file/tb"], {}, ["-t/--tensorboard_dir", "is a file"]),
    "export_under_a_file": (["--export_hf", "{tmp}/file/hf"], {}, ["--export_hf", "is a file"]),
    "export_into_the_save_dir": (["--export_hf", "{tmp}/ckpt/hf"], {}, ["--export_hf", "checkpoint directory"]),
    "config_not_an_object": (["-c", "{tmp}/config.json"], {}, ["config.json", "not a JSON object"]),
    "config_wrong_type": (["-c", "{tmp}/config.json"], {}, ["hidden_size must be a positive integer", "'64'"]),
    "config_heads_do_not_divide": (["-c", "{tmp}/config.json"], {}, ["hidden_size 64", "num_attention_heads 5"]),
    "config_negative_layers": (["-c", "{tmp}/config.json"], {}, ["num_hidden_layers must be a positive integer"]),
    "config_kv_heads_do_not_divide": (["-c", "{tmp}/config.json"], {}, ["num_key_value_heads 3"]),
    # a Llama 3 config.json whose rope_scaling lacks the llama3 type's fields; a model smaller than the tokenizer
    # (a Llama 3 tokenizer's 128,256 tokens with a 32,000-token model: here the shipped 32,000 with 1,000)
    "config_llama3_rope_scaling_incomplete": (
        ["-c", "{tmp}/config.json"],
        {},
        ["rope_scaling", "llama3", "low_freq_factor", "fix the config.json"],
    ),
    "tokenizer_larger_than_the_model": (
        ["-c", "{tmp}/config.json"],
        {},
        ["has 32000 tokens", "has 1000", "--tokenizer"],
    ),
    "prepared_meta_missing_key": (
        ["-d", "{tmp}/prepared"],
        {},
        ["meta.json", "'num_tokens'", "prepare the dataset again"],
    ),
    "prepared_offsets_missing": (["-d", "{tmp}/prepared"], {}, ["doc_offsets.npy", "prepare it again"]),
    "prepared_offsets_truncated": (["-d", "{tmp}/prepared"], {}, ["doc_offsets.npy", "prepare it again"]),
    "prepared_tokens_truncated": (["-d", "{tmp}/prepared"], {}, ["tokens.bin", "prepare it again"]),
    # ids the model's embedding does not have: found by a scan (prepared before meta.json recorded the
    # largest id) or from meta.json's record
    "prepared_ids_above_vocab": (
        ["-d", "{tmp}/prepared"],
        {},
        ["tokens.bin", "id 40000", "32000", "another tokenizer"],
    ),
    "prepared_recorded_id_above_vocab": (["-d", "{tmp}/prepared"], {}, ["tokens.bin", "id 50000", "prepare it again"]),
    "init_from_truncated_weights": (
        ["--init_from", "{tmp}/tiny"],
        {},
        ["model.safetensors", "cut short", "--init_from"],
    ),
    "parquet_without_text": (["-d", "{tmp}/data.parquet"], {}, ["no column 'text'", "content", "--text_field"]),
    # the readers take --text_field as one key (dotted paths are for --slice_field): refused before training
    "dotted_text_field": (
        ["-d", "{tmp}/data.jsonl", "--text_field", "meta.text"],
        {},
        ["no field 'meta.text'", "meta"],
    ),
    "running_states_missing_keys": (["-f", "{tmp}/step-3"], {}, ["running_states.json", "corrupt or incomplete"]),
    "running_states_wrong_types": (["-f", "{tmp}/step-3"], {}, ["running_states.json", "corrupt or incomplete"]),
    "latest_names_a_path_elsewhere": (["-f", "latest"], {}, ["latest", "not a step-<N> checkpoint beside it"]),
    "save_dir_of_another_run": (
        [],
        {},
        ["holds another run's checkpoints", "step-2", "-f latest", "--replace_checkpoints"],
    ),
    # gradient compression: only where a torch DDP syncs whole gradients
    "powersgd_with_zero2": (["--grad_compression", "powersgd"], {}, ["--grad_compression", "zero2", "ZeRO", "-p ddp"]),
    "powersgd_with_hybrid_zero": (
        ["-p", "hybrid_parallel", "-x", "bf16", "--zero_stage", "1", "--grad_compression", "powersgd"],
        {},
        ["--grad_compression", "--zero_stage 1", "--zero_stage 0"],
    ),
    "compress_stages_without_pipeline": (
        ["-p", "ddp", "--grad_compression", "powersgd", "--compress_stages", "1"],
        {},
        ["--compress_stages 1", "--pp > 1", "--pp 1"],
    ),
    "compress_stages_above_pp": (
        ["-p", "hybrid_parallel", "--pp", "2", "--grad_compression", "powersgd", "--compress_stages", "3"],
        {"WORLD_SIZE": "2"},
        ["--compress_stages 3", "--pp 2"],
    ),
    "powersgd_pipeline_tied_embeddings": (
        ["-c", "{tmp}/config.json", "-p", "hybrid_parallel", "--pp", "2", "--grad_compression", "powersgd"],
        {"WORLD_SIZE": "2"},
        ["tie_word_embeddings", "--pp 1", "fused embedding"],
    ),
    "compress_stages_without_compression": (
        ["-p", "hybrid_parallel", "--pp", "2", "--compress_stages", "1"],
        {"WORLD_SIZE": "2"},
        ["--compress_stages", "--grad_compression powersgd"],
    ),
    "powersgd_rank_zero": (
        ["-p", "ddp", "--grad_compression", "powersgd", "--powersgd_rank", "0"],
        {},
        ["--powersgd_rank", "at least 1", "got 0"],
    ),
    "powersgd_with_inplace_sgd": (
        ["-p", "ddp", "--optimizer", "inplace_sgd", "--grad_compression", "powersgd"],
        {},
        ["inplace_sgd", "--grad_compression", "adamw"],
    ),
    # sequence parallelism, pipelines and recompute (hybrid_parallel)
    "sp_without_mode": (["-p", "hybrid_parallel", "--sp", "2"], {"WORLD_SIZE": "2"}, ["--sp 2", "--sp_mode"]),
    "split_gather_without_tp": (["-p", "hybrid_parallel", "--sp_mode", "split_gather"], {}, ["split_gather", "--tp 2"]),
    "split_gather_with_its_own_sp": (
        ["-p", "hybrid_parallel", "--tp", "2", "--sp_mode", "split_gather", "--sp", "4"],
        {"WORLD_SIZE": "2"},
        ["--tp group", "drop --sp"],
    ),
    "ring_gives_wrong_gradients": (
        ["-p", "hybrid_parallel", "--tp", "2", "--sp_mode", "ring"],
        {"WORLD_SIZE": "2"},
        ["ring", "wrong weight gradients", "split_gather"],
    ),
    "all_to_all_without_sp": (["-p", "hybrid_parallel", "--sp_mode", "all_to_all"], {}, ["all_to_all", "--sp 2"]),
    "all_to_all_heads_do_not_divide": (
        ["-p", "hybrid_parallel", "--sp_mode", "all_to_all", "--sp", "3"],
        {"WORLD_SIZE": "3"},
        ["--sp 3", "4 attention heads"],
    ),
    "ring_attn_on_cpu": (
        ["-p", "hybrid_parallel", "--sp_mode", "ring_attn", "--sp", "2"],
        {"WORLD_SIZE": "2"},
        ["ring_attn", "CUDA", "flash-attn", "all_to_all"],
    ),
    "world_size_not_divisible_with_sp": (
        ["-p", "hybrid_parallel", "--sp_mode", "all_to_all", "--sp", "2"],
        {"WORLD_SIZE": "3"},
        ["world size 3", "tp*pp*sp", "--sp"],
    ),
    "tp_does_not_divide_heads": (
        ["-p", "hybrid_parallel", "--tp", "3"],
        {"WORLD_SIZE": "3"},
        ["--tp 3", "4 attention"],
    ),
    "pp_style_without_pp": (
        ["-p", "hybrid_parallel", "--pp_style", "interleaved"],
        {},
        ["--pp_style", "--pp 2 or more"],
    ),
    "recompute_layers_without_pp": (
        ["-p", "hybrid_parallel", "--recompute_layers_per_stage", "1"],
        {},
        ["--recompute_layers_per_stage", "--pp > 1", "crashes"],
    ),
    "chunks_with_1f1b": (
        ["-p", "hybrid_parallel", "--pp", "2", "--num_model_chunks", "2"],
        {"WORLD_SIZE": "2"},
        ["1f1b", "exactly 1", "--num_model_chunks"],
    ),
    "interleaved_microbatches_do_not_divide": (
        ["-c", "tiny4", "-p", "hybrid_parallel", "--pp", "2", "--pp_style", "interleaved", "-b", "3"],
        {"WORLD_SIZE": "2"},
        ["interleaved", "divisible by --pp 2", "got 3"],
    ),
    "num_microbatches_do_not_divide_batch": (
        ["-p", "hybrid_parallel", "--pp", "2", "--num_microbatches", "3"],
        {"WORLD_SIZE": "2"},
        ["-b 2", "--num_microbatches 3"],
    ),
    "layers_per_stage_do_not_add_up": (
        ["-p", "hybrid_parallel", "--pp", "2", "--num_layers_per_stage", "1,2"],
        {"WORLD_SIZE": "2"},
        ["--num_layers_per_stage 1,2", "2 layers"],
    ),
    "layers_per_stage_count": (
        ["-p", "hybrid_parallel", "--pp", "2", "--num_layers_per_stage", "1,1,0"],
        {"WORLD_SIZE": "2"},
        ["one count per pipeline stage (2)", "got 3"],
    ),
    "layers_per_stage_not_numbers": (
        ["-p", "hybrid_parallel", "--pp", "2", "--num_layers_per_stage", "a,b"],
        {"WORLD_SIZE": "2"},
        ["--num_layers_per_stage", "comma-separated", "'a,b'"],
    ),
    "layers_per_stage_with_interleaved": (
        [
            "-c",
            "tiny4",
            "-p",
            "hybrid_parallel",
            "--pp",
            "2",
            "--pp_style",
            "interleaved",
            "--num_layers_per_stage",
            "2,2",
        ],
        {"WORLD_SIZE": "2"},
        ["--num_layers_per_stage", "1f1b only"],
    ),  # fmt: skip
    "too_few_layers_for_the_chunks": (
        ["-p", "hybrid_parallel", "--pp", "2", "--pp_style", "interleaved"],
        {"WORLD_SIZE": "2"},
        ["2 layers cannot fill", "2 stages x 2 chunks"],
    ),
    "recompute_layers_more_than_a_stage_holds": (
        ["-c", "tiny4", "-p", "hybrid_parallel", "--pp", "2", "--recompute_layers_per_stage", "3,1"],
        {"WORLD_SIZE": "2"},
        ["--recompute_layers_per_stage 3,1", "more layers than the stages hold (2,2)"],
    ),
    "recompute_layers_count": (
        ["-p", "hybrid_parallel", "--pp", "2", "--recompute_layers_per_stage", "1"],
        {"WORLD_SIZE": "2"},
        ["one count per stage and model chunk (2 x 1)", "got 1"],
    ),
    "recompute_layers_with_recompute_none": (
        ["-p", "hybrid_parallel", "--pp", "2", "--recompute_layers_per_stage", "1,1", "--recompute", "none"],
        {"WORLD_SIZE": "2"},
        ["--recompute_layers_per_stage", "--recompute none"],
    ),
    "grad_checkpoint_with_selective": (["-g", "--recompute", "selective"], {}, ["-g means --recompute full"]),
    "zero2_with_pipeline": (
        ["-p", "hybrid_parallel", "--pp", "2", "--zero_stage", "2", "-x", "bf16"],
        {"WORLD_SIZE": "2"},
        ["--zero_stage 0 or 1"],
    ),
    "inplace_sgd_with_gemini": (["-p", "gemini", "--optimizer", "inplace_sgd"], {}, ["gemini", "chunk", "-p ddp"]),
    "inplace_sgd_with_pipeline": (
        ["-p", "hybrid_parallel", "--pp", "2", "--optimizer", "inplace_sgd"],
        {"WORLD_SIZE": "2"},
        ["inplace_sgd", "tensor and data parallelism only", "--pp"],
    ),
    "zbv_on_cpu": (
        ["-c", "tiny4", "-p", "hybrid_parallel", "--pp", "2", "--pp_style", "zbv"],
        {"WORLD_SIZE": "2"},
        ["zbv", "1f1b or interleaved"],
    ),
    "unknown_sp_mode": (["--sp_mode", "zigzag"], {}, ["zigzag", "split_gather", "all_to_all"]),
    # compressed backpropagation: only between pipeline stages, with a rank
    "compress_backprop_without_pipeline": (
        ["-p", "hybrid_parallel", "--compress_backprop", "4"],
        {},
        ["--compress_backprop", "--pp > 1", "--pp 1"],
    ),
    "compress_backprop_rank_zero": (
        ["-p", "hybrid_parallel", "--pp", "2", "--compress_backprop", "0"],
        {"WORLD_SIZE": "2"},
        ["--compress_backprop", "at least 1", "got 0"],
    ),
    # refused at run time, by what the data holds: still before the first file (the first batch is read first)
    "no_documents_for_this_rank": (
        ["-d", "{tmp}/data.jsonl", "--eval_data", str(HELD_OUT), "--eval_tokens", "256"],
        {},
        ["no documents for this data-parallel rank"],
    ),
    "mixture_slice_without_documents": (
        ["-d", "{tmp}/data.jsonl", "--data_mix", "a=1,b=1", "--slice_field", "part"],
        {},
        ["--data_mix slice 'b'", "no documents", "--slice_field"],
    ),
    "eval_data_too_small": (["--eval_data", "{tmp}/data.jsonl"], {}, ["--eval_data", "fewer than 256 tokens"]),
    "too_little_data_for_one_step": (  # (this case drops VALID's --max_steps)
        ["-d", "{tmp}/data.jsonl", "-e", "1"],
        {},
        ["fewer than 256 tokens per replica", "-b/-l"],
    ),
    # the lr schedule (warmup-stable-decay)
    "decay_fraction_zero": (["--lr_schedule", "wsd", "--decay_fraction", "0"], {}, ["--decay_fraction", "above 0"]),
    "decay_fraction_above_one": (
        ["--lr_schedule", "wsd", "--decay_fraction", "1.5"],
        {},
        ["--decay_fraction", "at most 1", "got 1.5"],
    ),
    "unknown_decay_shape": (
        ["--lr_schedule", "wsd", "--decay_shape", "sqrt"],
        {},
        ["--decay_shape", "'sqrt'", "1-sqrt"],
    ),
    "decay_shape_without_wsd": (["--decay_shape", "linear"], {}, ["--decay_shape", "add --lr_schedule wsd"]),
    "wsd_decay_longer_than_the_run": (
        ["--lr_schedule", "wsd", "-s", "1", "--decay_fraction", "1"],
        {},
        ["wsd", "1 warmup steps and 2 decay steps", "run's 2 steps", "lower --decay_fraction"],
    ),
    "wsd_decay_longer_than_the_epochs": (  # (this case drops VALID's --max_steps: the data sizes the run)
        ["-d", "{tmp}/data.jsonl", "-e", "1", "-s", "1000", "--lr_schedule", "wsd"],
        {},
        ["wsd", "1000 warmup steps", "do not fit in the run's", "lower --decay_fraction"],
    ),
    "compress_backprop_epilogue_only_without_rank": (
        ["-p", "hybrid_parallel", "--pp", "2", "--compress_backprop_epilogue_only"],
        {"WORLD_SIZE": "2"},
        ["--compress_backprop_epilogue_only", "--compress_backprop R"],
    ),
    # --config_file: the file's own errors name the file and the key; its values are checked as typed flags are
    "run_file_unknown_key": (["--config_file", "{tmp}/run.yaml"], {}, ["run.yaml", "unknown key 'max_stepz'"]),
    "run_file_wrong_type": (["--config_file", "{tmp}/run.yaml"], {}, ["run.yaml", "seed", "invalid int value: 'two'"]),
    "run_file_missing": (["--config_file", "{tmp}/nothing.yaml"], {}, ["nothing.yaml", "does not exist"]),
    "run_file_unparsable": (["--config_file", "{tmp}/run.toml"], {}, ["run.toml", "not valid TOML", "Unclosed array"]),
    "run_file_out_of_range": (["--config_file", "{tmp}/run.yaml"], {}, ["--lr", "above 0", "got -1"]),
    # W&B: checked before the run starts (metrics.wandb_problems), the project name by wandb's own rule
    "wandb_run_without_project": (["--wandb_run", "first"], {}, ["--wandb_run", "pass --wandb_project"]),
    "unknown_wandb_mode": (
        ["--wandb_project", "p", "--wandb_mode", "cloud"],
        {},
        ["--wandb_mode", "'cloud'", "offline"],
    ),
    "wandb_project_with_a_slash": (
        ["--wandb_project", "team/p"],
        {},
        ["--wandb_project", "'team/p'", "cannot contain"],
    ),
    "unknown_wandb_mode_in_the_environment": (
        ["--wandb_project", "p"],
        {"WANDB_MODE": "cloud"},
        ["WANDB_MODE=cloud", "online, offline, disabled", "--wandb_mode"],
    ),
}
GPU_ONLY_CASES = {"gemini_on_cpu", "gemini_auto_on_cpu", "ring_attn_on_cpu", "zbv_on_cpu"}
# Cases whose one error line follows the run's own lines on stderr (skipped data lines, a progress bar).
AFTER_OTHER_LINES = {"no_documents_for_this_rank", "too_little_data_for_one_step", "wsd_decay_longer_than_the_epochs"}
# Cases also run as real processes: an argparse error and a validation error.
IN_A_PROCESS = ["non_integer_batch_size", "incomplete_checkpoint"]


def _model_config(tmp, **changes) -> None:
    fields = {**TINY_CONFIG, **changes}
    (tmp / "config.json").write_text(json.dumps(fields))


def _prepared(tmp, damage: str) -> None:
    from llama_recipe.data import load_tokenizer
    from llama_recipe.prepared import prepare_dataset

    write_jsonl(tmp / "raw.jsonl", [f"document {i}: " + "words " * 40 for i in range(20)])
    prepare_dataset(str(tmp / "raw.jsonl"), str(tmp / "prepared"), load_tokenizer(TOKENIZER), progress=False)
    (tmp / "raw.jsonl").unlink()
    meta = tmp / "prepared" / "meta.json"
    if damage == "meta":
        meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "num_tokens"}))
    elif damage == "offsets missing":
        (tmp / "prepared" / "doc_offsets.npy").unlink()
    elif damage == "ids above vocab":  # as a dataset prepared before the largest id was recorded
        tokens = tmp / "prepared" / "tokens.bin"
        ids = np.fromfile(tokens, dtype="<u2")
        ids[len(ids) // 2] = 40000
        ids.tofile(tokens)
        meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "max_token_id"}))
    elif damage == "recorded id above vocab":
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "max_token_id": 50000}))
    else:
        target = tmp / "prepared" / ("doc_offsets.npy" if damage == "offsets truncated" else "tokens.bin")
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])


def _truncated_model(path) -> None:
    """A tiny Hugging Face model directory whose model.safetensors lost its last 1000 bytes."""
    from llama_recipe.model import build_model, get_model_config

    build_model(get_model_config("tiny")).save_pretrained(path, safe_serialization=True)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])


def _checkpoint(tmp, states: dict) -> None:
    step = tmp / "step-3"
    for part in ("model", "optimizer"):
        (step / part).mkdir(parents=True)
    (step / "lr_scheduler.pt").write_bytes(b"")
    (step / "running_states.json").write_text(json.dumps(states))


SETUP = {
    "run_file_unknown_key": lambda tmp: (tmp / "run.yaml").write_text("max_steps: 2\nmax_stepz: 3\n"),
    "run_file_wrong_type": lambda tmp: (tmp / "run.yaml").write_text("seed: two\n"),
    "run_file_unparsable": lambda tmp: (tmp / "run.toml").write_text("max_steps = [2\n"),
    "run_file_out_of_range": lambda tmp: (tmp / "run.yaml").write_text("lr: -1\n"),
    "incomplete_checkpoint": lambda tmp: (tmp / "step-3" / "model").mkdir(parents=True),  # a save that never finished
    "output_under_a_file": lambda tmp: (tmp / "file").write_text("x"),
    "tensorboard_under_a_file": lambda tmp: (tmp / "file").write_text("x"),
    "export_under_a_file": lambda tmp: (tmp / "file").write_text("x"),
    "config_not_an_object": lambda tmp: (tmp / "config.json").write_text("[1, 2]"),
    "config_wrong_type": lambda tmp: _model_config(tmp, hidden_size="64"),
    "powersgd_pipeline_tied_embeddings": lambda tmp: _model_config(tmp, tie_word_embeddings=True),
    "config_heads_do_not_divide": lambda tmp: _model_config(tmp, num_attention_heads=5, num_key_value_heads=5),
    "config_negative_layers": lambda tmp: _model_config(tmp, num_hidden_layers=-2),
    "config_kv_heads_do_not_divide": lambda tmp: _model_config(tmp, num_key_value_heads=3),
    "config_llama3_rope_scaling_incomplete": lambda tmp: _model_config(
        tmp, rope_scaling={"rope_type": "llama3", "factor": 8.0}
    ),
    "tokenizer_larger_than_the_model": lambda tmp: _model_config(tmp, vocab_size=1000),
    "prepared_meta_missing_key": lambda tmp: _prepared(tmp, "meta"),
    "prepared_offsets_missing": lambda tmp: _prepared(tmp, "offsets missing"),
    "prepared_offsets_truncated": lambda tmp: _prepared(tmp, "offsets truncated"),
    "prepared_tokens_truncated": lambda tmp: _prepared(tmp, "tokens truncated"),
    "prepared_ids_above_vocab": lambda tmp: _prepared(tmp, "ids above vocab"),
    "prepared_recorded_id_above_vocab": lambda tmp: _prepared(tmp, "recorded id above vocab"),
    "init_from_truncated_weights": lambda tmp: _truncated_model(tmp / "tiny"),
    "parquet_without_text": lambda tmp: __import__("pyarrow.parquet").parquet.write_table(
        __import__("pyarrow").table({"content": ["a document"] * 4}), tmp / "data.parquet"
    ),
    "dotted_text_field": lambda tmp: (tmp / "data.jsonl").write_text(
        json.dumps({"meta": {"text": "a document"}}) + "\n"
    ),
    "running_states_missing_keys": lambda tmp: _checkpoint(tmp, {"step": 3}),
    "running_states_wrong_types": lambda tmp: _checkpoint(
        tmp, {"step": "3", "consumed_samples": 1, "consumed_tokens": 1}
    ),
    "no_documents_for_this_rank": lambda tmp: write_jsonl(tmp / "data.jsonl", [""] * 4),  # empty texts: skipped
    "mixture_slice_without_documents": lambda tmp: write_jsonl(
        tmp / "data.jsonl", [{"text": "words " * 100, "part": "a"}] * 4
    ),
    "eval_data_too_small": lambda tmp: write_jsonl(tmp / "data.jsonl", ["a few words"]),
    "too_little_data_for_one_step": lambda tmp: write_jsonl(tmp / "data.jsonl", ["a few words"]),
    "wsd_decay_longer_than_the_epochs": lambda tmp: write_jsonl(tmp / "data.jsonl", ["a few words " * 200] * 4),
    "latest_names_a_path_elsewhere": lambda tmp: (
        (tmp / "ckpt").mkdir(),
        (tmp / "ckpt" / "latest").write_text("/etc\n"),
    ),
    "save_dir_of_another_run": lambda tmp: ((tmp / "ckpt").mkdir(), (tmp / "ckpt" / "latest").write_text("step-2\n")),
}
TINY_CONFIG = dict(model_type="llama", vocab_size=32000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, intermediate_size=176, max_position_embeddings=1024)  # fmt: skip


def _arguments(case: str, tmp) -> list[str]:
    if case in SETUP:
        SETUP[case](tmp)
    sized_by_data = ("hub_stream_without_max_steps", "too_little_data_for_one_step", "wsd_decay_longer_than_the_epochs")
    valid = VALID[:-2] if case in sized_by_data else VALID
    output = ["-o", str(tmp / "ckpt"), "-t", str(tmp / "tb")]
    return [*valid, *output, *(a.replace("{tmp}", str(tmp)) for a in CASES[case][0])]


def _check(proc, case: str, tmp, before: list) -> None:
    if case in AFTER_OTHER_LINES:
        expect_error_after_training(proc, *CASES[case][2], code=2)
    else:
        expect_one_line_error(proc, *CASES[case][2])
    assert not (tmp / "tb").exists()  # no TensorBoard file for a refused run
    assert sorted(p.relative_to(tmp) for p in tmp.rglob("*")) == before  # no checkpoint directory, nothing else


def test_the_valid_baseline_passes_validation():
    """The cases break exactly one thing: the starting command line itself is accepted."""
    validate(parse_args("pretrain", VALID), world_size=1)
    validate(parse_args("pretrain", [*VALID, "-p", "hybrid_parallel", "--tp", "2"]), world_size=4)


def test_a_wsd_decay_longer_than_max_steps_is_refused_by_validation_alone():
    """With --max_steps the run's length is known at once: refused before any data is read or any
    process group starts (a run sized by epochs is refused once its data is counted)."""
    wsd = ["--lr_schedule", "wsd", "-s", "1", "--decay_fraction", "1"]
    with pytest.raises(UsageError, match="1 warmup steps and 2 decay steps"):
        validate(parse_args("pretrain", [*VALID, *wsd]), world_size=1)


def _skip_gpu_only(cases):
    gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only check")
    return [pytest.param(case, marks=[gpu] if case in GPU_ONLY_CASES else []) for case in cases]


@pytest.mark.parametrize("case", _skip_gpu_only(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, case):
    args = _arguments(case, tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    _check(run_in_process("pretrain.py", args, env=CASES[case][1]), case, tmp_path, before)


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", IN_A_PROCESS)
def test_bad_input_in_a_real_process(tmp_path, case):
    """Nothing but the one line reaches stderr (no library chatter at import), and the exit code is 2."""
    args = _arguments(case, tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    _check(launch("pretrain.py", args, timeout=120), case, tmp_path, before)


def test_wandb_project_without_the_package_names_the_install(tmp_path, monkeypatch):
    """W&B is optional: without the package, --wandb_project is refused before anything is written."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: `import wandb` fails
    args = [*VALID, "-o", str(tmp_path / "ckpt"), "-t", str(tmp_path / "tb"), "--wandb_project", "p"]
    line = expect_one_line_error(run_in_process("pretrain.py", args))
    assert line == "error: W&B logging needs the wandb package: pip install wandb"


# finetune.py's --lora_* flags: (arguments added after FINETUNE_VALID, words the message must contain)
FINETUNE_VALID = ["-d", str(INSTRUCT_DATA), "--task_name", "self_instruct", "-l", "128", "--max_steps", "2"]
FINETUNE_CASES = {
    "lora_rank_zero": (["--lora_rank", "0"], ["--lora_rank", "at least 1", "got 0"]),
    "lora_alpha_zero": (["--lora_rank", "4", "--lora_alpha", "0"], ["--lora_alpha", "above 0", "got 0"]),
    "lora_alpha_without_rank": (["--lora_alpha", "8"], ["--lora_alpha", "add --lora_rank"]),
    "lora_unknown_target": (["--lora_rank", "4", "--lora_targets", "q_proj,qkv"], ["qkv", "q_proj,k_proj,v_proj"]),
    "lora_with_hybrid_parallel": (
        ["--lora_rank", "4", "-p", "hybrid_parallel"],
        ["--lora_rank", "-p ddp, zero2 or zero2_cpu", "enable_lora", "hybrid_parallel"],
    ),
    "lora_with_muon": (["--lora_rank", "4", "-p", "ddp", "--optimizer", "muon"], ["--lora_rank", "adamw", "muon"]),
}


@pytest.mark.parametrize("case", FINETUNE_CASES)
def test_bad_finetune_input_is_one_line_exit_2_and_writes_nothing(pretrained_dir, tmp_path, case):
    output = ["-o", str(tmp_path / "ckpt"), "-t", str(tmp_path / "tb")]
    args = ["--model_path", str(pretrained_dir), *FINETUNE_VALID, *output, *FINETUNE_CASES[case][0]]
    expect_one_line_error(run_in_process("finetune.py", args), *FINETUNE_CASES[case][1])
    assert list(tmp_path.iterdir()) == []


def test_every_case_is_in_the_docs_table():
    from conftest import REPO

    table = (REPO / "docs" / "robustness.md").read_text()
    assert [case for case in [*CASES, *FINETUNE_CASES] if f"| `{case}` |" not in table] == []


def test_llama_recipe_debug_shows_the_traceback_behind_the_one_line(tmp_path):
    """LLAMA_RECIPE_DEBUG=1: the same refusal, exit 2, with the traceback of where it was raised first."""
    case = "running_states_wrong_types"
    proc = run_in_process("pretrain.py", _arguments(case, tmp_path), env={"LLAMA_RECIPE_DEBUG": "1"})
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "in validate" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error:") and "running_states.json" in proc.stderr
