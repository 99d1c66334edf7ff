"""Greedy answers of a trained model to your prompts, on one process (CPU or the first GPU).

python scripts/generate.py runs/finetune/latest "Give three tips for staying healthy."
python scripts/generate.py exported/llama-tiny "Once upon a time" --max_new_tokens 64

The model is a checkpoint's step-<N> directory (or its `latest` file's target), an exported Hugging
Face directory, or a hub name. Prompts are used as given: for a finetuned model, write them as the
training prompts were written.
"""

import argparse
import sys
from pathlib import Path

from llama_recipe.errors import EXIT_USAGE, OneLineErrorParser, UsageError


def main() -> None:
    p: argparse.ArgumentParser = OneLineErrorParser(prog="generate.py", description=__doc__.splitlines()[0])
    p.add_argument("model", help="a step-<N> checkpoint, a `latest` file, an exported model directory or a hub name")
    p.add_argument("prompts", nargs="+", help="one or more prompts")
    p.add_argument("--max_new_tokens", type=int, default=48)
    args = p.parse_args()

    from llama_recipe.data import load_model_tokenizer
    from llama_recipe.instruct import generate_answers
    from llama_recipe.model import resolve_pretrained

    model_path = Path(args.model)
    if model_path.name == "latest" and model_path.is_file():  # the pointer a run writes next to its checkpoints
        model_path = model_path.parent / model_path.read_text().strip()
    try:
        model_dir = resolve_pretrained(str(model_path))
    except UsageError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(EXIT_USAGE)
    tokenizer = load_model_tokenizer(model_dir)
    answers = generate_answers(str(model_dir), tokenizer, args.prompts, args.max_new_tokens)
    for prompt, answer in zip(args.prompts, answers, strict=True):
        print(f"--- prompt:\n{prompt}\n--- answer:\n{answer}")


if __name__ == "__main__":
    main()
