"""The shipped held-out text (data/heldout) is text the training sample never shows: no run of 50
characters (whitespace collapsed) appears in any training document."""

from __future__ import annotations

import json

from conftest import DATA, REPO

HELD_OUT = REPO / "data" / "heldout" / "sherlock_holmes_1661.jsonl"
WINDOW, STRIDE = 50, 25  # every overlap of 75 characters or more contains one held-out window whole


def _texts(path) -> list[str]:
    return [" ".join(json.loads(line)["text"].split()) for line in path.open() if line.strip()]


def _shared_windows(held_out: list[str], training: list[str]) -> int:
    """How many held-out windows (every STRIDE characters) appear somewhere in the training text."""
    windows = {text[i : i + WINDOW] for text in held_out for i in range(0, len(text) - WINDOW + 1, STRIDE)}
    found = set()
    for text in training:  # every training position, so an overlap anywhere is seen
        for i in range(len(text) - WINDOW + 1):
            if text[i : i + WINDOW] in windows:
                found.add(text[i : i + WINDOW])
    return len(found)


def test_held_out_text_shares_nothing_with_the_training_sample():
    held_out = _texts(HELD_OUT)
    training = [t for path in sorted(DATA.glob("*.jsonl")) for t in _texts(path)]
    assert len(held_out) == 23 and sum(map(len, held_out)) > 200_000
    assert _shared_windows(held_out, training) == 0
    # The check finds overlap where there is some: a training document planted in the held-out side.
    assert _shared_windows([*held_out, training[5]], training) > 0
