"""The errors every module raises, and the exit code each one ends a script with.

This module imports nothing of ours, so any module can raise these without an import circle.
`cli.run_script` turns each into one line on stderr (no traceback) and its exit code.
"""

from __future__ import annotations

import argparse
import sys

EXIT_FAILURE = 1  # something broke that is not the user's input (a full disk during a save, ...)
EXIT_USAGE = 2  # bad input: flags, paths, data, checkpoints
EXIT_DIVERGED = 3  # training produced a non-finite loss


class UsageError(Exception):
    """Bad input from the user: one line naming the problem and the fix, exit code 2."""

    exit_code = EXIT_USAGE


class CheckpointError(Exception):
    """A checkpoint that cannot be written (the previous ones are intact): one line, exit code 1."""

    exit_code = EXIT_FAILURE


class TrainingDiverged(Exception):
    """The loss became NaN or infinite; nothing was saved from that step on: one line, exit code 3."""

    exit_code = EXIT_DIVERGED


RECIPE_ERRORS = (UsageError, CheckpointError, TrainingDiverged)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """--help with each flag's default, as `(default: 0.0003)`; none for a flag that is off or unset
    (argparse's own ArgumentDefaultsHelpFormatter would print `(default: None)` and `(default: False)`)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS  # (0 == False)
        if unset or "%(default)" in help_text:
            return help_text
        return f"{help_text} (default: %(default)s)".lstrip()


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse prints the whole usage block on a bad flag; we print one line and exit 2. --help
    shows the defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        sys.stderr.write(f"error: {message} (run {self.prog} --help for the flags)\n")
        sys.exit(EXIT_USAGE)
