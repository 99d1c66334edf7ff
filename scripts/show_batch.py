"""Show what a training step read, from a run's data ledger: the first thing to look at after a loss spike.

python scripts/show_batch.py RUN STEP             # each rank's documents of step STEP, with their first words
python scripts/show_batch.py --quarantine RUN     # the quarantined documents, as JSON ([file, record] pairs)

RUN is the run's TensorBoard directory (-t), as the run printed at its start ("data ledger:
RUN/ledger/..."); with the default -t, the run's -o works too, and so does the ledger directory. A
step written twice (by a run and by the run resumed before it) shows as last written. --quarantine
reads the newest checkpoint's list: RUN is then the run's -o (or a step-<N> checkpoint).
"""

import argparse
import json
import sys

from llama_recipe.errors import RECIPE_ERRORS, OneLineErrorParser
from llama_recipe.ledger import documents_text, find_ledger, quarantine_of, step_entries


def show_step(run: str, step: int, chars: int, text_field: str) -> None:
    directory = find_ledger(run)
    entries = step_entries(directory, step)
    print(f"step {step}, from {directory}:")
    for rank, entry in entries.items():
        documents = entry.get("documents")
        what = f"{len(documents)} documents" if documents is not None else "no documents recorded"
        print(f"rank {rank}: fingerprint {entry['fingerprint']}, {what}")
        if "rows" in entry:  # prepared data: row r is tokens r * seq_len .. (r + 1) * seq_len of tokens.bin
            print(f"  rows of tokens.bin: {entry['rows']}")
        texts = documents_text(documents or [], text_field) if chars else {}
        for name, record in documents or []:
            text = texts.get((name, record))
            shown = "" if text is None else "  " + " ".join(text.split())[:chars]
            print(f"  {name}:{record}{shown}")


def main() -> None:
    p: argparse.ArgumentParser = OneLineErrorParser(prog="show_batch.py", description=__doc__.splitlines()[0])
    p.add_argument("run", help="the run's -t directory (or its -o); with --quarantine its -o, or a checkpoint")
    p.add_argument("step", nargs="?", type=int, help="the step to show")
    p.add_argument("--quarantine", action="store_true", help="print the quarantined documents as JSON instead")
    p.add_argument("--chars", type=int, default=100, help="characters of each document to show (0: none)")
    p.add_argument("--text_field", default="text", help="the records' text field, as the run's --text_field")
    args = p.parse_args()
    if args.quarantine == (args.step is not None):
        p.error("give a STEP to show, or --quarantine (not both)")
    try:
        if args.quarantine:
            print(json.dumps(quarantine_of(args.run)))
        else:
            show_step(args.run, args.step, args.chars, args.text_field)
    except RECIPE_ERRORS as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
