"""Tokenize a pretraining corpus once into a memory-mapped token file that pretrain.py -d can read.

python scripts/prepare_data.py -d data/redpajama-sample -o data/redpajama-prepared
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
    p.add_argument("-o", "--out_dir", required=True, help="directory to write tokens.bin, doc_offsets.npy, meta.json")
    p.add_argument("--tokenizer", default=str(SHIPPED_TOKENIZER), help="tokenizer directory or HF name")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it already holds a prepared dataset")
    p.add_argument("--no_progress", action="store_true", help="no progress bar (for logs)")
    args = p.parse_args()

    # Imported here: --help and flag errors stay instant.
    from llama_recipe.data import check_dataset_source, load_tokenizer
    from llama_recipe.prepared import check_out_dir, prepare_dataset

    try:
        # The cheap checks first, so a typo fails before the tokenizer loads.
        check_dataset_source(args.dataset)
        check_out_dir(args.out_dir, args.overwrite)
        tokenizer = load_tokenizer(args.tokenizer)
        stats = prepare_dataset(
            args.dataset, args.out_dir, tokenizer, progress=not args.no_progress, overwrite=args.overwrite
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
