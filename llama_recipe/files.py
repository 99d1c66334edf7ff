"""Putting a finished directory in place without ever leaving a half-written one behind."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def move_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished directory `tmp` to `final`. Whatever `final` held (the caller checked it may
    be replaced) is set aside first and deleted only once `tmp` is in place, so a crash at any moment
    leaves the old or the new directory, never neither and never a mix."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.is_dir() and any(final.iterdir()):
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        if final.is_dir():
            final.rmdir()  # empty: the rename needs the name free
        os.replace(tmp, final)
