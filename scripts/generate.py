"""Greedy answers of a trained model to your prompts, on one process (CPU or the first GPU).

python scripts/generate.py runs/finetune/latest "Give three tips for staying healthy."
python scripts/generate.py exported/llama-tiny "Once upon a time" --max_new_tokens 64

The model is a checkpoint's step-<N> directory (or its `latest` file's target), an exported Hugging
Face directory, or a hub name. Prompts are used as given: for a finetuned model, write them as the
training prompts were written.
"""

import argparse
import sys

from llama_recipe.errors import EXIT_USAGE, OneLineErrorParser, UsageError


def main() -> None:
    p: argparse.ArgumentParser = OneLineErrorParser(prog="generate.py", description=__doc__.splitlines()[0])
    p.add_argument("model", help="a step-<N> checkpoint, a `latest` file, an exported model directory or a hub name")
    p.add_argument("prompts", nargs="+", help="one or more prompts")
    p.add_argument("--max_new_tokens", type=int, default=48)
    args = p.parse_args()

    from llama_recipe.checkpoint import resolve_checkpoint_arg
    from llama_recipe.data import load_model_tokenizer
    from llama_recipe.instruct import generate_answers
    from llama_recipe.model import resolve_pretrained

    try:
        if args.max_new_tokens < 1:
            raise UsageError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
        model_dir = resolve_pretrained(resolve_checkpoint_arg(args.model))  # a `latest` file: its checkpoint
        tokenizer = load_model_tokenizer(model_dir)
        answers = generate_answers(str(model_dir), tokenizer, args.prompts, args.max_new_tokens)
    except UsageError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(EXIT_USAGE)
    for prompt, answer in zip(args.prompts, answers, strict=True):
        print(f"--- prompt:\n{prompt}\n--- answer:\n{answer}")


if __name__ == "__main__":
    main()
