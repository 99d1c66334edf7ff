"""The two recipes: each decides where the model shape, the starting weights and the batches come
from, then hands them to the shared loop (`trainer.fit`)."""

from __future__ import annotations

import time

from .checkpoint_paths import resolve_checkpoint
from .config import SHIPPED_TOKENIZER, TrainConfig
from .data import (
    Prefetcher,
    SyntheticBatches,
    build_pretrain_batches,
    count_tokens,
    held_out_text_batches,
    load_model_tokenizer,
    load_tokenizer,
)
from .distributed import fewest_across_ranks, is_main_process, launch, print_main, rank, world_size
from .errors import UsageError
from .evaluate import eval_documents, eval_scores, evaluate_documents
from .export import checkpoint_model
from .files import append_json_line
from .instruct import InstructionBatches, generate_answers, held_out_batches, load_instruction_rows, split_held_out
from .model import (
    check_tokenizer_fits,
    count_parameters,
    get_model_config,
    inference_placement,
    load_pretrained_model,
    weights_location,
)
from .optim import finetune_warmup_steps
from .parallel import Parallelism, build_parallelism
from .prepared import PreparedBatches, check_prepared_tokenizer
from .sources import SKIPPED, dataset_kind, source_for
from .trainer import RunPlan, fit


def pretrain(cfg: TrainConfig) -> dict:
    """Pretrain a randomly initialised model on packed text, or continue pretraining existing
    weights (--init_from: the model shape and tokenizer come with them)."""
    launch(cfg.training.seed, cfg.parallel.dist_timeout)
    par = build_parallelism(cfg)
    initial_weights = None
    if cfg.model.init_from:
        model_dir = resolve_checkpoint(cfg.model.init_from, "--init_from")
        model_config, initial_weights = get_model_config(str(model_dir)), weights_location(model_dir)
        tokenizer = load_model_tokenizer(model_dir, cfg.data.tokenizer)
        print_main(f"continued pretraining from {model_dir} (its config.json sets the model's shape)")
    else:
        model_config = get_model_config(cfg.model.config)
        tokenizer = load_tokenizer(cfg.data.tokenizer or str(SHIPPED_TOKENIZER))
    check_tokenizer_fits(tokenizer, model_config, cfg.model.init_from or f"-c {cfg.model.config}")
    seq_len = cfg.data.max_length or model_config.max_position_embeddings
    batches, total_steps = pretrain_batches(cfg, par, tokenizer, model_config.vocab_size, seq_len)
    batches = Prefetcher(batches)  # prepares the next batches while the model trains
    try:
        if not cfg.checkpoint.load or cfg.checkpoint.reset_data:  # (a resumed stream is the one its run read)
            batches.start()  # the first batch now: data with none for this rank is refused before any file
        plan = RunPlan(
            model_config,
            batches,
            total_steps,
            cfg.optim.warmup_steps,
            tokenizer,
            seq_len,
            "pretraining",
            initial_weights=initial_weights,
            held_out=pretrain_held_out(cfg, par, tokenizer, seq_len),
        )
        summary = fit(cfg, par, plan)
    finally:
        batches.close()
    if SKIPPED:
        details = ", ".join(f"{n} {reason}" for reason, n in SKIPPED.items())
        print(
            f"warning (rank {rank()}): skipped {sum(SKIPPED.values())} unusable data lines while training "
            f"({details}; a line read in several epochs counts each time)"
        )
    return summary


def pretrain_held_out(cfg: TrainConfig, par: Parallelism, tokenizer, seq_len: int) -> list[dict] | None:
    """--eval_data's fixed held-out batches for this replica (None without it)."""
    if not cfg.evaluation.eval_data:
        return None
    batches, tokens = held_out_text_batches(
        source_for(cfg.held_out_data()),
        tokenizer,
        seq_len,
        cfg.training.batch_size,
        par.dp_rank,
        par.dp_size,
        cfg.evaluation.eval_tokens,
    )
    short = (
        f" (all it holds; fewer than --eval_tokens {cfg.evaluation.eval_tokens:,})"
        if tokens < cfg.evaluation.eval_tokens
        else ""
    )
    when = f"every {cfg.training.eval_interval} steps, " if cfg.training.eval_interval else ""
    print_main(
        f"held-out: {tokens:,} tokens of {cfg.evaluation.eval_data}{short}, evaluated before training, {when}"
        "and at the end"
    )
    return batches


def pretrain_batches(cfg: TrainConfig, par: Parallelism, tokenizer, vocab_size: int, seq_len: int):
    """This replica's batches for `-d`, and the run's length in optimizer steps."""
    data, training = cfg.data, cfg.training
    kind = dataset_kind(data.dataset)
    rows_per_step = training.batch_size * training.accumulation_steps
    steps_per_epoch = None
    if kind == "synthetic":
        if not training.max_steps:
            raise UsageError("-d synthetic has no epochs; pass --max_steps")
        batches = SyntheticBatches(vocab_size, seq_len, training.batch_size, seed=training.seed + par.dp_rank)
    elif kind == "prepared":
        check_prepared_tokenizer(data.dataset, tokenizer)
        shuffle = data.shuffle_buffer > 0
        batches = PreparedBatches(
            data.dataset, seq_len, training.batch_size, par.dp_rank, par.dp_size, training.seed, shuffle
        )
        steps_per_epoch = batches.rows_per_replica // rows_per_step
    else:
        batches = build_pretrain_batches(
            source_for(data),
            tokenizer,
            seq_len,
            training.batch_size,
            par.dp_rank,
            par.dp_size,
            data.data_mix,
            seed=training.seed,
            shuffle_buffer=data.shuffle_buffer,
            shuffle_rows=data.shuffle_rows,
        )
    if training.max_steps:
        return batches, training.max_steps
    if steps_per_epoch is None:  # a token count of this replica's stream (the replica with the least data decides)
        tokens = count_tokens(source_for(data), tokenizer, par.dp_rank, par.dp_size, progress=is_main_process())
        steps_per_epoch = fewest_across_ranks(tokens // seq_len // rows_per_step)
    if steps_per_epoch == 0:
        raise UsageError(
            f"the data holds fewer than {seq_len * rows_per_step} tokens per replica, not enough for one step; "
            "lower -b/-l/--accumulation_steps or add data"
        )
    return batches, steps_per_epoch * training.num_epochs


def finetune(cfg: TrainConfig) -> dict:
    """Finetune pretrained weights on prompt/completion pairs, with the loss on completions only."""
    launch(cfg.training.seed, cfg.parallel.dist_timeout)
    par = build_parallelism(cfg)
    data, training = cfg.data, cfg.training
    model_dir = resolve_checkpoint(cfg.model.model_path, "--model_path")
    model_config = get_model_config(str(model_dir))
    tokenizer = load_model_tokenizer(model_dir, data.tokenizer)
    max_length = data.max_length or model_config.max_position_embeddings
    rows, held_out_rows = split_held_out(
        load_instruction_rows(data.dataset, data.task_name), data.eval_split, training.seed
    )
    batches = InstructionBatches(
        rows,
        tokenizer,
        max_length,
        training.batch_size,
        par.dp_rank,
        par.dp_size,
        training.seed,
        pad_to_max_length=par.pipeline,
        pack=data.pack_examples,
    )
    held_out = held_out_batches(
        held_out_rows, tokenizer, max_length, training.batch_size, par.dp_rank, par.dp_size, par.pipeline
    )
    # packed rows differ per replica; all must run the same steps
    total_steps = training.max_steps or (
        fewest_across_ranks(batches.steps_per_epoch // training.accumulation_steps) * training.num_epochs
    )
    if total_steps == 0:
        raise UsageError("the dataset is too small for one step; lower -b or --accumulation_steps")
    print_main(
        f"finetuning on {len(rows):,} examples of {data.dataset} ({data.task_name}), {len(held_out_rows)} held out, "
        f"{max_length} tokens max" + (", several examples per row (--pack_examples)" if data.pack_examples else "")
    )
    warmup_steps = finetune_warmup_steps(cfg.optim.warmup_ratio, total_steps)
    plan = RunPlan(
        model_config,
        batches,
        total_steps,
        warmup_steps,
        tokenizer,
        max_length,
        "finetuning",
        initial_weights=weights_location(model_dir),
        held_out=held_out,
        script="finetune",
    )
    summary = fit(cfg, par, plan)
    if is_main_process() and summary["checkpoint"] and held_out_rows:
        summary["generations"] = show_answers(cfg, summary, tokenizer, [r["prompt"] for r in held_out_rows[:3]])
    if batches.truncated:
        print_main(
            f"note: {batches.truncated} examples on rank 0 were longer than -l {max_length}; their prompts were cut"
        )
    return summary


def show_answers(cfg: TrainConfig, summary: dict, tokenizer, prompts: list[str]) -> list[tuple[str, str]]:
    """Show what finetuning did: the final checkpoint's greedy answers to held-out prompts (printed,
    and in TensorBoard's text tab)."""
    model = checkpoint_model(summary["checkpoint"]).float()  # fp32 on the CPU, whatever it trained in
    answers = generate_answers(model, tokenizer, prompts)
    generations = list(zip(prompts, answers, strict=True))
    for prompt, answer in generations:
        print(f"--- held-out prompt:\n{prompt.strip()}\n--- model answer:\n{answer}")
    if cfg.logging.tensorboard_dir:
        from torch.utils.tensorboard import SummaryWriter  # optional heavy dependency: only when used

        with SummaryWriter(cfg.logging.tensorboard_dir) as writer:
            for i, (prompt, answer) in enumerate(generations):
                writer.add_text(f"generation/{i}", f"**prompt**: {prompt}\n\n**answer**: {answer}", summary["steps"])
    return generations


def evaluate(cfg: TrainConfig) -> dict:
    """eval.py: score a trained model on held-out text (perplexity or cloze; see evaluate.py)."""
    launch(cfg.training.seed, cfg.parallel.dist_timeout)
    model_dir = resolve_checkpoint(cfg.model.model_path, "--model_path")
    model_config = get_model_config(str(model_dir))
    tokenizer = load_model_tokenizer(model_dir, cfg.data.tokenizer)
    check_tokenizer_fits(tokenizer, model_config, str(model_dir))
    if dataset_kind(cfg.data.dataset) == "prepared":  # its ids must mean this tokenizer's words
        check_prepared_tokenizer(cfg.data.dataset, tokenizer)
    task, positions = cfg.evaluation.task, model_config.max_position_embeddings
    max_length = cfg.data.max_length or positions
    stride = cfg.evaluation.stride or max_length
    dtype, where = inference_placement()
    model = load_pretrained_model(model_dir, dtype, where)
    print_main(
        f"evaluating {model_dir} ({count_parameters(model_config) / 1e6:,.1f}M parameters, {str(dtype)[6:]}) on "
        f"{cfg.data.dataset}, {world_size()} processes: "
        + (
            "the last word of each document, greedily (cloze)"
            if task == "cloze"
            else f"windows of {max_length} tokens, {stride} newly scored each after the first, one BOS per document"
        )
    )
    started = time.perf_counter()
    documents = eval_documents(cfg.data, tokenizer, cfg.evaluation.limit)
    sums = evaluate_documents(model, tokenizer, documents, task, max_length, stride, cfg.training.batch_size)
    seconds = time.perf_counter() - started
    if not sums["documents"] or not (sums["tokens"] or sums["cloze_documents"]):
        raise UsageError(f"-d {cfg.data.dataset} holds no text to evaluate (empty documents only); pass other data")
    result = dict(
        model=str(model_dir),
        data=cfg.data.dataset,
        task=task,
        max_length=max_length,
        stride=stride,
        processes=world_size(),
        seconds=seconds,
        tokens_per_s=sums["tokens"] / seconds,
        **sums,
        **eval_scores(sums),
    )
    print_main(eval_report(result))
    if cfg.logging.results and is_main_process():
        append_json_line(cfg.logging.results, result)
    return result


def eval_report(r: dict) -> str:
    """What eval.py prints: the numbers in words."""
    if r["task"] == "cloze":
        return (
            f"cloze accuracy {r['cloze_accuracy']:.4f} ({r['cloze_correct']:.0f} of {r['cloze_documents']:.0f} "
            f"documents' last words predicted greedily), cloze perplexity {r['cloze_perplexity']:,.3f}"
        )
    return (
        f"token perplexity {r['token_perplexity']:,.4f} ({r['tokens']:,.0f} tokens of {r['documents']:.0f} documents), "
        f"bits per byte {r['bits_per_byte']:.4f}, word perplexity {r['word_perplexity']:,.3f}; "
        f"{r['tokens_per_s']:,.0f} tokens/s in {r['seconds']:.1f} s"
    )
