"""eval.py: perplexity over rolling windows equals a plain `transformers` computation, lm-eval's
windows, one and two processes agree, cloze accuracy on a case with a known answer, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from conftest import (
    DATA,
    REPO,
    check_ok,
    expect_one_line_error,
    launch,
    read_scalars,
    read_wandb_run,
    run_in_process,
    trainer_batches,
    wandb_run_files,
    write_jsonl,
)

from llama_recipe.data import held_out_text_batches
from llama_recipe.evaluate import cloze_split, rolling_windows
from llama_recipe.sources import resolve_source

HELD_OUT = REPO / "data" / "heldout" / "sherlock_holmes_1661.jsonl"


def lm_eval_rolling_windows(token_list, prefix_token, max_seq_len, context_len):
    """lm-evaluation-harness 0.4's `lm_eval.utils.get_rolling_token_windows`, verbatim in substance
    (the reference our windows must reproduce for stride == max_length)."""
    pred_len = max_seq_len - context_len + 1
    predicted = 0
    first_seq_len = min(max_seq_len, len(token_list))
    yield ([prefix_token] + token_list[: first_seq_len - 1], token_list[:first_seq_len])
    predicted += first_seq_len
    while predicted < len(token_list):
        window_pred_len = min(len(token_list) - predicted, pred_len)
        window_end = predicted + window_pred_len
        yield (
            token_list[window_end - max_seq_len - 1 : window_end - 1],
            token_list[window_end - window_pred_len : window_end],
        )
        predicted += window_pred_len


@pytest.mark.parametrize(
    "n, max_length, stride", [(1, 4, 4), (10, 4, 4), (10, 4, 2), (10, 4, 1), (37, 8, 3), (8, 8, 8)]
)
def test_rolling_windows_score_every_token_once_with_context(n, max_length, stride):
    windows = rolling_windows(n, max_length, stride)
    scored = [t for _, end, first in windows for t in range(first, end + 1)]
    assert scored == list(range(1, n + 1))  # each target once, in order
    for i, (start, end, first) in enumerate(windows):
        assert end - start <= max_length and start < first <= end + 1
        if i > 0:  # a later window's first target sees max_length - stride + 1 tokens (the last one: at least)
            context = first - start
            assert context == max_length - stride + 1 if i < len(windows) - 1 else context >= max_length - stride + 1


@pytest.mark.parametrize("n, max_length", [(1, 4), (10, 4), (37, 8), (16, 8)])
def test_disjoint_windows_are_lm_evals(n, max_length):
    stream = list(range(100, 100 + n + 1))  # [BOS] + n tokens, all distinct
    ours = [(stream[s:e], stream[f : e + 1]) for s, e, f in rolling_windows(n, max_length, max_length)]
    theirs = list(lm_eval_rolling_windows(stream[1:], stream[0], max_length, 1))
    assert ours == theirs


def test_cloze_split():
    assert cloze_split("He opened the door and saw his  cat.\n") == ("He opened the door and saw his", "  cat.")
    assert cloze_split("one") is None


def reference_perplexity(model_dir, texts, max_length, stride):
    """The same windows, computed the plain way: full logits of each window, one window at a time."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    nll, tokens = 0.0, 0
    for text in texts:
        stream = [tok.bos_token_id, *tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]]
        done = 0  # targets 1..done scored
        while done < len(stream) - 1:
            last = done + min(max_length if done == 0 else stride, len(stream) - 1 - done)
            start = max(0, last - max_length)
            with torch.no_grad():
                logprobs = model(input_ids=torch.tensor([stream[start:last]])).logits[0].float().log_softmax(-1)
            for target in range(done + 1, last + 1):
                nll -= float(logprobs[target - 1 - start, stream[target]])
            tokens += last - done
            done = last
    nbytes = sum(len(t.encode()) for t in texts)
    return dict(token_perplexity=math.exp(nll / tokens), bits_per_byte=nll / math.log(2) / nbytes, tokens=tokens)


def held_out_texts(n, chars=1000):
    return [json.loads(line)["text"][:chars] for line in HELD_OUT.read_text().splitlines()[:n]]


def run_eval(args, tmp_path, name="r.jsonl"):
    results = tmp_path / "results" / name  # a folder made for it
    proc = run_in_process("eval.py", [*args, "--results", str(results)])
    check_ok(proc)
    return json.loads(results.read_text().splitlines()[-1]), proc


def test_perplexity_equals_plain_transformers(pretrained_dir, tmp_path):
    texts = held_out_texts(3)
    data = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in texts])
    r, proc = run_eval(["--model_path", str(pretrained_dir), "-d", str(data), "-l", "64", "--stride", "24",
                        "-b", "3"], tmp_path)  # fmt: skip
    ref = reference_perplexity(pretrained_dir, texts, 64, 24)
    assert r["tokens"] == ref["tokens"] and r["documents"] == 3
    assert r["token_perplexity"] == pytest.approx(ref["token_perplexity"], rel=1e-4)
    assert r["bits_per_byte"] == pytest.approx(ref["bits_per_byte"], rel=1e-4)
    words = sum(len(t.split()) for t in texts)  # (the texts start and end with a non-space)
    assert r["word_perplexity"] == pytest.approx(math.exp(r["nats"] / words), rel=1e-9)
    assert "windows of 64 tokens, 24 newly scored each after the first, one BOS per document" in proc.stdout
    assert "token perplexity" in proc.stdout and "bits per byte" in proc.stdout
    # a wide-weight model predicts far from uniform; a smaller stride (more context) must change the number
    assert abs(math.log(ref["token_perplexity"]) - math.log(32000)) > 0.5


@pytest.mark.multiprocess
def test_two_processes_give_the_same_numbers(pretrained_dir, tmp_path):
    data = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in held_out_texts(5)])  # 5 over 2 ranks: 3 + 2
    args = ["--model_path", str(pretrained_dir), "-l", "128", "-d", str(data)]
    one, _ = run_eval(args, tmp_path, "one.jsonl")
    check_ok(launch("eval.py", [*args, "--results", str(tmp_path / "two.jsonl")], nproc=2))
    two = json.loads((tmp_path / "two.jsonl").read_text())
    assert (one["processes"], two["processes"]) == (1, 2)
    for key in ("documents", "tokens", "bytes", "words"):
        assert one[key] == two[key]
    for key in ("token_perplexity", "bits_per_byte", "word_perplexity"):
        assert two[key] == pytest.approx(one[key], rel=1e-9), key


def test_cloze_accuracy_on_a_known_case(pretrained_dir, tmp_path):
    """Documents whose last word is the model's greedy next token (found with `generate`), and
    documents ending in a word it does not predict: accuracy is exactly their share."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(pretrained_dir).eval()
    tok = AutoTokenizer.from_pretrained(pretrained_dir)
    right, wrong = [], []
    for context in " ".join(held_out_texts(2)).split(". "):
        context = " ".join(context.split()[:12])
        ids = tok(context, return_tensors="pt")
        with torch.no_grad():
            greedy = model.generate(**ids, max_new_tokens=1, do_sample=False, pad_token_id=tok.eos_token_id)[0, -1]
        piece = tok.convert_ids_to_tokens(int(greedy))
        if not (piece.startswith("\u2581") and piece[1:].isalpha() and len(piece) > 3):
            continue
        word = piece[1:]
        if tok(f"{context} {word}", add_special_tokens=False)["input_ids"][-1] != int(greedy):
            continue  # the whole text would tokenize the word otherwise
        if len(right) < 3:
            right.append(f"{context} {word}")
        elif len(wrong) < 2:
            wrong.append(f"{context} {'elephant' if word != 'elephant' else 'giraffe'}")
        if len(wrong) == 2:
            break
    assert len(right) == 3 and len(wrong) == 2
    data = write_jsonl(tmp_path / "cloze.jsonl", [{"text": t} for t in right + wrong])
    r, proc = run_eval(["--model_path", str(pretrained_dir), "-d", str(data), "--task", "cloze"], tmp_path)
    assert (r["cloze_correct"], r["cloze_documents"], r["cloze_accuracy"]) == (3, 5, 0.6)
    assert "cloze accuracy 0.6000 (3 of 5" in proc.stdout


def test_bad_input_is_one_line(pretrained_dir, tmp_path):
    from llama_recipe.model import build_model, get_model_config

    cases = [
        (["--model_path", str(tmp_path / "missing")], "does not exist"),
        (["--model_path", str(pretrained_dir), "-l", "64", "--stride", "65"], "--stride 65 is larger than"),
        (["--model_path", str(pretrained_dir), "-l", "4096"], "exceeds the model's 1024 positions"),
        (["--model_path", str(pretrained_dir), "--task", "bleu"], "invalid choice"),
    ]
    no_text = write_jsonl(tmp_path / "no_text.jsonl", [{"content": "a document"}])
    write_jsonl(tmp_path / "held.jsonl", [{"text": "A held-out document, prepared once."}] * 3)
    cases.append((["--model_path", str(pretrained_dir), "-d", str(no_text)], "text"))
    small_vocab = get_model_config("tiny")
    small_vocab.vocab_size = 1000
    build_model(small_vocab).save_pretrained(tmp_path / "vocab1000")
    cases.append((["--model_path", str(tmp_path / "vocab1000")], "has 32000 tokens but the model"))
    # a prepared -d whose ids were made by another tokenizer (its meta says so): refused, not scored
    from llama_recipe.data import load_tokenizer
    from llama_recipe.prepared import prepare_dataset

    prepare_dataset(str(no_text.with_name("held.jsonl")), str(tmp_path / "prepared"), load_tokenizer(str(pretrained_dir)),
                    progress=False)  # fmt: skip
    meta = json.loads((tmp_path / "prepared" / "meta.json").read_text())
    (tmp_path / "prepared" / "meta.json").write_text(json.dumps(dict(meta, vocab_size=50000)))
    cases.append(
        (["--model_path", str(pretrained_dir), "-d", str(tmp_path / "prepared")], "was prepared with tokenizer")
    )
    for args, words in cases:
        expect_one_line_error(run_in_process("eval.py", args), words)


def _tensorboard_tags(directory) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return events.Tags()["scalars"]


def test_continued_pretraining_starts_from_the_weights_and_resumes(pretrained_dir, tokenizer, tmp_path):
    """--init_from: the first step's loss is a plain `transformers` forward of those weights on the
    first batch; the held-out loss before training is that model's too; `-f` resumes as usual.
    Both runs also log to W&B offline (--wandb_mode, then $WANDB_MODE): its files, read back, hold
    the TensorBoard scalars and the run.yaml flags, and the resume continues the same W&B run."""
    from transformers import LlamaForCausalLM

    common = ["-c", "small", "-d", str(DATA), "-l", "128", "-b", "2", "-s", "0", "--lr", "1e-3", "-p", "ddp",
              "--init_from", str(pretrained_dir), "--eval_data", str(HELD_OUT), "--eval_tokens", "256",
              "-o", str(tmp_path / "ckpt"), "--wandb_project", "recipe-tests"]  # fmt: skip
    full = run_in_process(
        "pretrain.py", [*common, "--max_steps", "4", "-i", "2", "-t", str(tmp_path / "tb"), "--wandb_mode", "offline"]
    )
    check_ok(full)
    (first_run,) = wandb_run_files(tmp_path / "ckpt")
    logged = read_wandb_run(first_run)
    tags = _tensorboard_tags(tmp_path / "tb")
    assert {"train/loss", "train/grad_norm", "eval/loss"} <= set(tags)
    assert {tag for row in logged.history for tag in row} == {*tags, "step"}  # the same scalars, no more
    for tag in tags:  # (TensorBoard keeps float32)
        assert logged.scalars(tag) == pytest.approx(read_scalars(tmp_path / "tb", tag), rel=1e-6), tag
    run_file = yaml.safe_load((tmp_path / "ckpt" / "step-4" / "run.yaml").read_text())
    assert logged.config == run_file and logged.config["wandb_mode"] == "offline"
    assert "continued pretraining from" in full.stdout and "4.2M parameters" in full.stdout  # -c small is not used
    model = LlamaForCausalLM.from_pretrained(pretrained_dir).eval()
    batch = trainer_batches(tokenizer, 0, 1).next_batch()
    with torch.no_grad():
        first = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.item()
    losses = read_scalars(tmp_path / "tb")
    assert losses[1] == pytest.approx(first, abs=1e-4)
    held_out, _ = held_out_text_batches(resolve_source(str(HELD_OUT)), tokenizer, 128, 2, 0, 1, 256)
    with torch.no_grad():
        before = model(input_ids=held_out[0]["input_ids"], labels=held_out[0]["labels"]).loss.item()
    assert read_scalars(tmp_path / "tb", "eval/loss")[0] == pytest.approx(before, abs=1e-4)
    resumed = run_in_process(
        "pretrain.py",
        [*common, "--max_steps", "4", "-i", "0", "-t", str(tmp_path / "tb2"), "-f", str(tmp_path / "ckpt" / "step-2")],
        env={"WANDB_MODE": "offline"},
    )
    check_ok(resumed)
    again = read_scalars(tmp_path / "tb2")
    assert sorted(again) == [3, 4] and all(again[s] == losses[s] for s in (3, 4))
    (second_run,) = set(wandb_run_files(tmp_path / "ckpt")) - {first_run}
    continued = read_wandb_run(second_run)
    assert continued.run_id == logged.run_id  # step-2 recorded the W&B run: its curves go on
    assert continued.scalars("train/loss") == pytest.approx(again, rel=1e-6)
