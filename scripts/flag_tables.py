"""Rewrite the flag tables in README.md (the common flags) and docs/flags.md (all of them) from the
scripts' parsers; tests/test_cli.py fails when they differ.

python scripts/flag_tables.py
"""

import re
from pathlib import Path

from llama_recipe.cli import flag_table

ROOT = Path(__file__).resolve().parent.parent
FILES = {ROOT / "README.md": False, ROOT / "docs" / "flags.md": True}  # file -> every flag, or the common ones


def with_tables(text: str, everything: bool) -> str:
    """`text` with every `<!-- flags:SCRIPT -->` block replaced by SCRIPT's generated table."""
    for script in ("pretrain", "finetune", "benchmark", "eval"):
        table = f"<!-- flags:{script} -->\n{flag_table(script, everything)}\n<!-- /flags:{script} -->"
        block = re.compile(rf"<!-- flags:{script} -->\n.*?<!-- /flags:{script} -->", re.S)
        text = block.sub(lambda _, table=table: table, text)
    return text


if __name__ == "__main__":
    for path, everything in FILES.items():
        path.write_text(with_tables(path.read_text(), everything))
        print(f"rewrote the flag tables in {path}")
