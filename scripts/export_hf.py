"""Export a checkpoint as a Hugging Face model directory.

python scripts/export_hf.py checkpoint/step-1000 exported/llama-tiny
python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('exported/llama-tiny')"
"""

import argparse
import sys

from llama_recipe.errors import RECIPE_ERRORS, OneLineErrorParser
from llama_recipe.export import export_hf


def main() -> None:
    p: argparse.ArgumentParser = OneLineErrorParser(prog="export_hf.py", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a step-<N> checkpoint, a run's directory (its latest) or its `latest` file")
    p.add_argument("out", help="where to write the Hugging Face model directory")
    p.add_argument("--tokenizer", default=None, help="tokenizer to include (default: the one saved in the checkpoint)")
    args = p.parse_args()
    try:
        out = export_hf(args.checkpoint, args.out, args.tokenizer)
    except RECIPE_ERRORS as e:  # bad input (exit 2); a full disk (exit 1)
        sys.stderr.write(f"error: {e}\n")
        sys.exit(e.exit_code)
    print(f"exported {args.checkpoint} to {out}")


if __name__ == "__main__":
    main()
