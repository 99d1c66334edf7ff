"""Tied embeddings (Llama 3.2 1B/3B: the output layer is the embedding matrix) under every CPU plugin, and a
Llama 3 style tokenizer through `--tokenizer`.

The 2-process runs ride in the plugin matrix's launches (conftest's `tied_runs`): `tiny` with
tie_word_embeddings, 3 steps saving at step 2, and a run resuming from step 2. Under pp2 the embedding sits on
the first stage and the output layer on the last, as two copies: ColossalAI's HybridParallelPlugin all-reduces
their gradients (the Llama policy's `get_shared_params`), so the copies must stay equal, step after step.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DATA, LAYOUTS, TIED_RESUME_FROM, TIED_STEPS, check_ok, run_in_process
from safetensors import safe_open

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def saved_tensors(model_dir) -> dict[str, torch.Tensor]:
    """Every tensor of a saved model, read with the safetensors library alone (not transformers' loader)."""
    tensors = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118 (safe_open is no dict)
    return tensors


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_tied_embeddings_train_save_and_resume(layout_runs, layout):
    run = layout_runs(layout)
    losses, resumed = run["tied_losses"], run["tied_resumed_losses"]
    assert sorted(losses) == list(range(1, TIED_STEPS + 1)) and losses[TIED_STEPS] < losses[1] - 0.02, losses
    assert sorted(resumed) == list(range(TIED_RESUME_FROM + 1, TIED_STEPS + 1))
    for step, loss in resumed.items():  # bit for bit, as the untied runs
        assert loss == losses[step], f"step {step}: {loss!r} after resume vs {losses[step]!r}"

    for step in (TIED_RESUME_FROM, TIED_STEPS):
        model_dir = run["root"] / "tied" / "ckpt" / f"step-{step}" / "model"
        assert json.loads((model_dir / "config.json").read_text())["tie_word_embeddings"] is True
        tensors = saved_tensors(model_dir)
        # A plugin may save the tied matrix once or under both names; both copies must then be one matrix (under
        # pp2 the first stage's embedding and the last stage's output layer, each saved by its own stage).
        if HEAD in tensors:
            assert torch.equal(tensors[HEAD], tensors[EMBED]), f"step {step}: lm_head and embed_tokens differ"


@pytest.mark.multiprocess
def test_tied_layouts_train_the_same_model(layout_runs):
    """The replicated layouts (2 replicas) agree, and so do the one-replica ones: tp2's single sharded matrix and
    pp2's two synchronised copies take the same steps (a copy updated from its own stage's gradient alone would
    give other losses from step 2 on)."""
    for group in (["ddp", "zero2", "zero2_cpu"], ["tp2", "pp2"]):
        first = layout_runs(group[0])["tied_losses"]
        for layout in group[1:]:
            losses = layout_runs(layout)["tied_losses"]
            for step in first:
                assert losses[step] == pytest.approx(first[step], abs=1e-5), f"{layout} vs {group[0]}, step {step}"


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", ["pp2", "tp2"])
def test_tied_export_keeps_the_tying(layout_runs, tmp_path, layout):
    """The export of a tied checkpoint (pp2's: two stage files, both names; tp2's: the matrix once) is a
    directory transformers loads with lm_head tied to the embeddings, whose logits are the final hidden states
    times the checkpoint's matrix; every tensor in it reads back through the safetensors library."""
    from transformers import LlamaForCausalLM

    from llama_recipe.export import export_hf

    checkpoint = layout_runs(layout)["root"] / "tied" / "ckpt" / f"step-{TIED_STEPS}"
    saved = saved_tensors(checkpoint / "model")[EMBED]
    out = export_hf(str(checkpoint), str(tmp_path / "hf"))
    exported = saved_tensors(out)
    assert torch.equal(exported[EMBED], saved)
    assert torch.equal(exported.get(HEAD, exported[EMBED]), saved)  # transformers writes a tied matrix once
    model = LlamaForCausalLM.from_pretrained(out).eval()
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    input_ids = torch.tensor([[1, 450, 4996, 17354, 1701, 29916]])
    with torch.no_grad():
        hidden = model.model(input_ids).last_hidden_state
        logits = model(input_ids).logits
    torch.testing.assert_close(logits, hidden @ saved.T, rtol=0, atol=1e-5)


def test_a_llama3_style_tokenizer_loads_and_trains(tmp_path):
    """A byte-level BPE tokenizer.json with Llama 3's special tokens, as Meta's tokenizer directory has it
    (<|begin_of_text|> prepended by its post-processor, <|end_of_text|> the EOS): --tokenizer loads it and
    pretraining tokenizes with it (BOS first, EOS last) and trains."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from llama_recipe.data import load_tokenizer, tokenize_texts

    bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    lines = [json.loads(line)["text"] for line in (DATA / "arxiv_sample.jsonl").read_text().splitlines()[:20]]
    bpe.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=600, special_tokens=[bos, eos]))
    bpe.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, bpe.token_to_id(bos))])
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=eos).save_pretrained(tmp_path / "tok")

    tokenizer = load_tokenizer(str(tmp_path / "tok"))
    assert (tokenizer.bos_token, tokenizer.eos_token, len(tokenizer)) == (bos, eos, 600)
    [ids] = tokenize_texts(tokenizer, ["The quick brown fox"])
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id and len(ids) > 3
    assert tokenizer.decode(ids[1:-1]) == "The quick brown fox"

    args = ["-c", "tiny", "-d", str(DATA), "-l", "64", "-b", "2", "--lr", "5e-3", "--max_steps", "3"]
    proc = run_in_process("pretrain.py", [*args, "--tokenizer", str(tmp_path / "tok"), "-o", str(tmp_path / "ckpt")])
    check_ok(proc)
    assert "done: 3 steps" in proc.stdout
    assert (tmp_path / "ckpt" / "step-3" / "model" / "tokenizer.json").is_file()  # saved with the checkpoint
