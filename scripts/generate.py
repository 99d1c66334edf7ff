"""Answers of a trained model to your prompts, greedy or sampled, on one process (CPU).

python scripts/generate.py runs/finetune/latest "Give three tips for staying healthy."
python scripts/generate.py exported/llama-tiny "Once upon a time" --max_new_tokens 64
python scripts/generate.py exported/llama-tiny "Once upon a time" --temperature 0.8 --top_p 0.95 --seed 1

The same generation code serves `serve.py`'s requests, so the same settings give the same text.

The model is a checkpoint's step-<N> directory (or its `latest` file's target), an exported Hugging
Face directory, or a hub name. Prompts are used as given: for a finetuned model, write them as the
training prompts were written.
"""

import argparse
import sys

from llama_recipe.errors import EXIT_USAGE, OneLineErrorParser, UsageError


def main() -> None:
    p: argparse.ArgumentParser = OneLineErrorParser(prog="generate.py", description=__doc__.splitlines()[0])
    p.add_argument(
        "model",
        help="a step-<N> checkpoint, a run's directory or its `latest` file, an exported model directory or a hub name",
    )
    p.add_argument("prompts", nargs="+", help="one or more prompts")
    p.add_argument("--max_new_tokens", type=int, default=48, help="the most tokens of each answer")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0: sample")
    p.add_argument("--top_k", type=int, default=0, help="sample only among the k most likely tokens (0: all)")
    p.add_argument("--top_p", type=float, default=1.0, help="sample only within this probability mass")
    p.add_argument("--seed", type=int, default=None, help="the same seed gives the same sampled text")
    args = p.parse_args()

    from llama_recipe.checkpoint_paths import resolve_checkpoint
    from llama_recipe.data import load_model_tokenizer
    from llama_recipe.generation import Sampling
    from llama_recipe.instruct import generate_answers
    from llama_recipe.lora import is_lora_checkpoint, merged_model
    from llama_recipe.model import check_tokenizer_fits, get_model_config

    try:
        if args.max_new_tokens < 1:
            raise UsageError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
        sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
        if sampling.problem():
            raise UsageError(f"--{sampling.problem()}")
        model_dir = resolve_checkpoint(args.model, "generate.py")
        tokenizer = load_model_tokenizer(model_dir)
        check_tokenizer_fits(tokenizer, get_model_config(str(model_dir)), str(model_dir))
        # a LoRA checkpoint's model/ holds no weights: its base with the adapters merged in
        lora = is_lora_checkpoint(model_dir.parent)
        model = merged_model(model_dir.parent) if lora else str(model_dir)
        answers = generate_answers(model, tokenizer, args.prompts, sampling)
    except UsageError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(EXIT_USAGE)
    for prompt, answer in zip(args.prompts, answers, strict=True):
        print(f"--- prompt:\n{prompt}\n--- answer:\n{answer}")


if __name__ == "__main__":
    main()
