"""Tokenize a pretraining corpus once into a memory-mapped token file that pretrain.py -d can read.

python scripts/prepare_data.py -d data/redpajama-sample -o data/redpajama-prepared
python scripts/prepare_data.py -d HuggingFaceFW/fineweb-edu --data_config sample-10BT --max_tokens 2e9 -o fineweb-2B
python pretrain.py -d data/redpajama-prepared ...
"""

import argparse
import sys

from llama_recipe.config import SHIPPED_TOKENIZER
from llama_recipe.errors import OneLineErrorParser, UsageError


def main() -> None:
    p: argparse.ArgumentParser = OneLineErrorParser(prog="prepare_data.py", description=__doc__.splitlines()[0])
    p.add_argument(
        "-d",
        "--dataset",
        required=True,
        help="what pretrain.py -d takes: a Hugging Face dataset, or local JSONL / JSONL.gz / Parquet (file, directory, glob)",
    )
    p.add_argument("--data_dir", help="only the data files under this folder of -d")
    p.add_argument("--data_config", help="a hub dataset's configuration (e.g. sample-10BT)")
    p.add_argument("--text_field", default="text", help="the field holding each document's text")
    p.add_argument("--max_tokens", type=float, default=None, help="stop after this many tokens (whole documents)")
    p.add_argument("-o", "--out_dir", required=True, help="directory to write tokens.bin, doc_offsets.npy, meta.json")
    p.add_argument("--tokenizer", default=str(SHIPPED_TOKENIZER), help="tokenizer directory or HF name")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it already holds a prepared dataset")
    p.add_argument("--no_progress", action="store_true", help="no progress bar (for logs)")
    args = p.parse_args()

    # Imported here: --help and flag errors stay instant.
    from llama_recipe.data import load_tokenizer
    from llama_recipe.prepared import check_out_dir, prepare_dataset
    from llama_recipe.sources import resolve_source

    try:
        if args.max_tokens is not None and not args.max_tokens >= 1:
            raise UsageError(f"--max_tokens must be at least 1, got {args.max_tokens:g}")
        # The cheap checks first, so a typo fails before the tokenizer loads.
        source = resolve_source(args.dataset, args.data_dir, args.data_config, args.text_field)
        check_out_dir(args.out_dir, args.overwrite)
        tokenizer = load_tokenizer(args.tokenizer)
        max_tokens = int(args.max_tokens) if args.max_tokens else None
        stats = prepare_dataset(
            source,
            args.out_dir,
            tokenizer,
            progress=not args.no_progress,
            overwrite=args.overwrite,
            max_tokens=max_tokens,
        )
    except UsageError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    print(
        f"prepared {stats['num_docs']:,} docs, {stats['num_tokens']:,} tokens ({stats['skipped']:,} skipped docs) "
        f"in {stats['seconds']:.1f} s ({stats['tokens_per_s']:,.0f} tokens/s) -> {args.out_dir}"
    )


if __name__ == "__main__":
    main()
