"""Rewrite the README's flag tables from the scripts' parsers (tests/test_cli.py fails when they differ).

python scripts/flag_tables.py
"""

import re
from pathlib import Path

from llama_recipe.cli import flag_table

README = Path(__file__).resolve().parent.parent / "README.md"


def with_tables(text: str) -> str:
    """`text` with every `<!-- flags:SCRIPT -->` block replaced by SCRIPT's generated table."""
    for script in ("pretrain", "finetune", "benchmark"):
        table = f"<!-- flags:{script} -->\n{flag_table(script)}\n<!-- /flags:{script} -->"
        block = re.compile(rf"<!-- flags:{script} -->\n.*?<!-- /flags:{script} -->", re.S)
        text = block.sub(lambda _, table=table: table, text)
    return text


if __name__ == "__main__":
    README.write_text(with_tables(README.read_text()))
    print(f"rewrote the flag tables in {README}")
