"""One run per save directory: the lock a run holds on -o while it trains, naming its holder."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

from filelock import FileLock, Timeout

from .distributed import is_main_process, print_main
from .errors import UsageError

LOCK = ".lock"  # save_dir/.lock: the host and pid of the run writing there


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class SaveDirLock:
    """One run per -o: while a run trains, rank 0 holds save_dir/.lock, a file lock (flock, through
    `filelock`) whose file names its host, pid and start, so that a second run on the same directory
    is refused in one line naming them instead of overwriting the first one's checkpoints. The kernel
    releases the lock when its process dies: a lock file left by a run that died is taken over, with
    a message. The holder writes its name while it acquires (filelock's on_acquired), and a refused
    run waits for that name rather than taking an unnamed lock for a stale one."""

    def __init__(self, save_dir: str | None):
        self.path = Path(save_dir) / LOCK if save_dir and is_main_process() else None
        self.mine = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.made_dir = False  # a run that ends before saving anything leaves no empty directory behind
        self.lock: FileLock | None = None
        self.inode = -1  # the lock file this run holds (removed at the end only if it is still that one)

    def __enter__(self) -> SaveDirLock:
        if self.path is None:
            return self
        self.made_dir = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = FileLock(self.path, blocking=False, on_acquired=self._claim)
        deadline = time.monotonic() + 2.0  # the holder writes its name right after it took the lock
        while True:
            try:
                self.lock.acquire()
                return self
            except Timeout:  # held by a live process
                holder = self._holder()
                if holder is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.01)  # its name is being written, or it was just released: look again
        holder = holder or {}
        raise UsageError(
            f"another run (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('since', '?')}) "
            f"is writing to {self.path.parent}; pass another -o, or wait for that run to end"
        )

    def _claim(self, fd: int) -> None:
        """filelock's on_acquired (the lock is ours): a name still in the file is a dead run's; write ours."""
        previous = os.pread(fd, 4096, 0)
        if previous.strip():  # its run died without removing the file
            try:
                pid = json.loads(previous)["pid"]
            except (ValueError, KeyError, TypeError):
                pid = "?"
            print_main(f"taking over {self.path}: the run that held it (pid {pid}) is no longer running")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.mine).encode(), 0)
        self.inode = os.fstat(fd).st_ino

    def _holder(self) -> dict | None:
        """The name the live holder wrote into the lock file; None while there is none yet (or only a
        dead run's, which the run taking the lock over is replacing)."""
        try:
            holder = json.loads(self.path.read_text())
            host, pid = str(holder["host"]), int(holder["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return None if host == self.mine["host"] and not _pid_alive(pid) else holder

    def __exit__(self, *exc_info) -> None:
        if self.lock is None or not self.lock.is_locked:
            return
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self.inode:
                # Our own step: filelock leaves the file in place, but a finished run leaves -o as it found it
                # (no lock file, no empty directory). Removed while still held: a run that opened it meanwhile
                # finds it unlinked once it gets the lock (filelock checks) and takes a new one.
                self.path.unlink()
        self.lock.release()
        if self.made_dir:
            with contextlib.suppress(OSError):  # not empty: it holds what this run saved
                self.path.parent.rmdir()
