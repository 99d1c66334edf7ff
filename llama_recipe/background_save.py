"""--async_save: a checkpoint handed to a background writer thread after a short stall, written
while training goes on, and completed exactly as a synchronous save (checkpoint_io.py) is."""

from __future__ import annotations

import functools
import shutil
import threading
import time
from pathlib import Path

from .checkpoint_io import DONE, complete_checkpoint, save_failed, temporary_dir, write_states
from .checkpoint_paths import checkpoint_path
from .distributed import any_rank, is_main_process, rank, synchronize, world_size
from .files import WRITE_ERRORS
from .parallel import Parallelism


class BackgroundSave:
    """--async_save: one checkpoint written by a background thread after the loop's short stall.

    The stall (`start_background_save`, every rank, collective): the booster's save with every model
    and optimizer file handed to this writer instead of written (device tensors copied to host
    memory on the way), plus the small files. Host tensors are not copied at all: the writer reads
    the weights and optimizer states themselves, while the next step's forward and backward run,
    and the loop waits for it (`wait_written`) only before it would change them (the optimizer
    step; in-place SGD's update inside backward): CheckFreq's pipelined snapshot (FAST '21).

    Each rank's thread writes its files, then a done-marker (`.done/rank-<R>`); rank 0's thread
    waits for every rank's marker (ranks agree through the files, as a thread must not run
    collectives beside training) and completes the checkpoint exactly as a synchronous save does:
    `running_states.json`, the rename into place, then `latest`. A crash or kill -9 before that
    leaves the previous checkpoint the latest one. `wait` (every rank) joins the thread.
    """

    def __init__(self, final: Path, tmp: Path, deferred: list, finish, timeout: float):
        self.final, self.tmp, self.deferred, self.finish, self.timeout = final, tmp, deferred, finish, timeout
        self.started, self.size, self.seconds, self.error = time.perf_counter(), 0, 0.0, None
        self.waited = 0.0  # seconds training waited in `wait_written`
        self.written = threading.Event()  # this rank's files are on disk: training may change the tensors
        self.thread = threading.Thread(target=self._run, name=f"save {final.name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            try:
                for write in self.deferred:
                    write()
                self.deferred = []  # the references (or host copies) can go
                (self.tmp / DONE / f"rank-{rank()}").write_text("")
            finally:
                self.written.set()  # also on failure: training must never wait forever
            if self.finish is not None:  # rank 0
                self._wait_for_every_rank()
                shutil.rmtree(self.tmp / DONE)
                self.size = self.finish()
        except Exception as e:  # every error, bugs too: a thread's is lost unless handed to `wait`
            self.error = e  # every rank learns of it alike; finish_background raises it as the cause
            if self.finish is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
        self.seconds = time.perf_counter() - self.started

    def _wait_for_every_rank(self) -> None:
        deadline = time.monotonic() + self.timeout
        while len(list((self.tmp / DONE).iterdir())) < world_size():
            if time.monotonic() > deadline:
                raise TimeoutError(f"not every rank finished writing within {self.timeout:g} s")
            time.sleep(0.01)

    def wait_written(self) -> None:
        """Block until this rank's files are written (before training changes what they are read from)."""
        if not self.written.is_set():
            started = time.perf_counter()
            self.written.wait()
            self.waited += time.perf_counter() - started

    def wait(self) -> bool:
        """Join the writer; whether every rank's save succeeded (a collective: every rank calls it)."""
        self.thread.join()
        return not any_rank(self.error is not None)


def start_background_save(
    par: Parallelism,
    model,
    optimizer,
    lr_scheduler,
    save_dir: str,
    running_states: dict,
    data_state: dict,
    tokenizer=None,
    keep_last: int = 0,
    run_file: str | None = None,
    timeout: float = 1800.0,
) -> BackgroundSave:
    """save_checkpoint's work, but returning once the state is handed to a background writer (every rank)."""
    final = checkpoint_path(save_dir, running_states["step"])
    tmp, deferred = final.with_name(f".{final.name}.tmp"), []
    try:
        tmp = temporary_dir(final, par)
        write_states(par, model, optimizer, lr_scheduler, tmp, data_state, deferred)
        synchronize()  # the device-to-host copies `to_host` queued have landed
    except WRITE_ERRORS as e:  # a full disk while writing the small files (see save_checkpoint)
        raise save_failed(final, tmp, e) from None
    finish = None
    if is_main_process():
        finish = functools.partial(complete_checkpoint, tmp, final, running_states, tokenizer, keep_last, run_file)
    return BackgroundSave(final, tmp, deferred, finish, timeout)
