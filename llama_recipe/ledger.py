"""The data ledger and the quarantine: what each step trained on, and what it must never train on again.

The ledger is one JSON line per step and rank, appended and flushed as the step ends (kill -9 loses
at most the step in flight): `{"step", "rank", "documents": [[file name, record], ...], "fingerprint"}`.
The documents are those with a stretch in the step's rows on that rank (all its micro-batches), in
the order they first appear; the fingerprint is blake2b-64 of the rows' input_ids (int64 bytes), so
two runs fed the same tokens write the same one. Prepared data has no documents: its lines name
the rows instead (`"rows"`: row r is tokens r * seq_len .. (r + 1) * seq_len of tokens.bin);
synthetic data logs the fingerprint only.

Where: beside the run's TensorBoard logs, `<-t>/ledger/rank-<R>.jsonl` (by default
`<-o>/tensorboard/ledger/`; `-t ''`: no ledger), printed at the start of the run. A resumed run
appends the steps after its checkpoint again, so the last line written for a step is the one that
counts (`scripts/show_batch.py RUN STEP` shows it). Resuming exactly, the first step's fingerprint
is compared with the line the interrupted run wrote for that step (in its recorded -t): another one
means the data or the stream changed, which is one warning line naming the step.

The quarantine: a step whose update was skipped as non-finite, or rolled back as a loss spike, has
its documents (every rank's, gathered) left out of the stream for the rest of the run (see
`data.PackedRows.add_quarantine`); the list is part of the data state every checkpoint holds, so a
resumed run leaves them out too, and `scripts/show_batch.py --quarantine RUN` exports it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.distributed as dist

from .config import TENSORBOARD_SUBDIR, TrainConfig
from .distributed import any_rank, print_main, rank, world_size
from .document_order import read_texts
from .errors import UsageError
from .metrics import resumed_tensorboard_dir
from .sources import Source

LEDGER_SUBDIR = "ledger"


def ledger_dir(tensorboard_dir: str | None) -> Path | None:
    """Where a run's ledger goes: beside its TensorBoard logs (none without them)."""
    return Path(tensorboard_dir) / LEDGER_SUBDIR if tensorboard_dir else None


def fingerprint(input_ids: list[torch.Tensor]) -> str:
    """blake2b-64 of the micro-batches' input_ids, as int64 bytes in order."""
    digest = hashlib.blake2b(digest_size=8)
    for ids in input_ids:
        digest.update(ids.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def read_ledger(path: Path) -> dict[int, dict]:
    """A rank's ledger file as {step: its last line} (a line cut short by a kill is left out)."""
    found = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        found[entry["step"]] = entry
    return found


def find_ledger(run: str | Path) -> Path:
    """The ledger directory of RUN: the run's -t directory, its -o (with the default -t), or the ledger itself."""
    run = Path(run)
    for directory in (run / LEDGER_SUBDIR, run / TENSORBOARD_SUBDIR / LEDGER_SUBDIR, run):
        if directory.is_dir() and any(directory.glob("rank-*.jsonl")):
            return directory
    raise UsageError(
        f"{run} holds no data ledger ({LEDGER_SUBDIR}/rank-<R>.jsonl); pass the run's -t directory (or its -o)"
    )


def step_entries(directory: Path, step: int) -> dict[int, dict]:
    """{rank: the last line written for `step`} over the ledger's rank files."""
    files = sorted(directory.glob("rank-*.jsonl"), key=lambda f: int(f.stem.removeprefix("rank-")))
    found = {int(f.stem.removeprefix("rank-")): read_ledger(f).get(step) for f in files}
    found = {r: entry for r, entry in found.items() if entry is not None}
    if not found:
        raise UsageError(f"{directory} has no line for step {step}; the run may not have reached it")
    return found


def documents_text(documents: list[list], text_field: str = "text") -> dict[tuple[str, int], str | None]:
    """The text of (file name, record) documents, read from their files (each file scanned once from its
    start: the ledger names records, not byte offsets); None for one that cannot be read."""
    by_file: dict[str, list[int]] = {}
    for name, record in documents:
        by_file.setdefault(name, []).append(record)
    texts: dict[tuple[str, int], str | None] = {}
    for name, records in by_file.items():
        source = Source(name, (name,), text_field)
        try:
            found = read_texts(source, [(0, record, 0) for record in records])
        except (OSError, ValueError) as e:
            print_main(f"note: could not read {name} ({type(e).__name__}); its documents are shown by name only")
            found = {}
        for record in records:
            doc = found.get((0, record, 0))
            texts[(name, record)] = doc["text"] if doc else None
    return texts


def quarantine_of(run: str | Path) -> list[list]:
    """The quarantine a run's newest checkpoint holds (or that of RUN, a step-<N> checkpoint)."""
    run = Path(run)
    checkpoint = run
    if not (run / "data").is_dir() and (run / "latest").is_file():
        checkpoint = run / (run / "latest").read_text().strip()
    if not (checkpoint / "data" / "rank-0.json").is_file():
        raise UsageError(f"{run} is neither a run's -o directory with a checkpoint nor a step-<N> checkpoint")
    return json.loads((checkpoint / "data" / "rank-0.json").read_text()).get("quarantine", [])


def _cut_partial_line(path: Path) -> None:
    """Drop a last line without its newline (the step a kill -9 interrupted), so the next line starts clean."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


class DataLedger:
    """The batches the trainer reads (it stands in for them: `next_batch`, the rest passed through),
    with what each step read written to this rank's ledger file, and the quarantine fed back."""

    def __init__(self, cfg: TrainConfig, batches, start_step: int, resumed_exactly: bool):
        self.batches = batches
        self.ids: list[torch.Tensor] = []  # the step's micro-batches so far
        self.provenance: dict[str, list] = {}
        self.last: dict = {}  # the last step's line
        directory = ledger_dir(cfg.logging.tensorboard_dir)
        self.path = directory / f"rank-{rank()}.jsonl" if directory else None
        # resuming exactly: the interrupted run's line for the first step (in its ledger, beside its recorded -t)
        self.check_step = start_step + 1 if cfg.checkpoint.load and resumed_exactly else None
        self.expected = None
        theirs = ledger_dir(resumed_tensorboard_dir(cfg)) if self.check_step is not None else None
        if theirs is not None:
            self.expected = read_ledger(theirs / f"rank-{rank()}.jsonl").get(self.check_step)
        self.file = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if start_step == 0 and not cfg.checkpoint.load:
                self.path.write_text("")  # a fresh run, a fresh ledger
            elif self.path.is_file():
                _cut_partial_line(self.path)
            self.file = open(self.path, "a")  # noqa: SIM115 (open for the whole run; closed on leaving the loop)
            print_main(
                f"data ledger: {directory}/rank-<R>.jsonl, a line per step and rank (scripts/show_batch.py "
                f"{directory.parent} STEP shows a step's documents)"
            )

    def next_batch(self) -> dict[str, torch.Tensor]:
        batch = self.batches.next_batch()
        self.record(batch, getattr(self.batches, "provenance", {}))
        return batch

    def record(self, batch: dict, provenance: dict) -> None:
        """One micro-batch of the step, and where it came from."""
        self.ids.append(batch["input_ids"])
        for key, values in provenance.items():
            self.provenance.setdefault(key, []).extend(values)

    def __getattr__(self, name):  # epoch, state_dict, load_state_dict, ...
        return getattr(self.batches, name)

    def write(self, step: int, quarantine: bool = False) -> None:
        """Record the step just trained; with `quarantine`, its documents are never fed again. Every
        rank calls it (the resume check and the quarantine are collectives)."""
        entry = {"step": step, "rank": rank(), "fingerprint": fingerprint(self.ids)}
        for key, values in self.provenance.items():  # documents appear once, in their first row's order
            entry[key] = [list(v) for v in dict.fromkeys(map(tuple, values))] if key == "documents" else values
        self.ids, self.provenance, self.last = [], {}, entry
        if self.file is not None:
            self.file.write(json.dumps(entry, separators=(",", ":")) + "\n")
            self.file.flush()
        if step == self.check_step:
            differs = self.expected is not None and self.expected["fingerprint"] != entry["fingerprint"]
            if any_rank(differs):
                print_main(
                    f"warning: step {step} trained on other tokens than the interrupted run recorded for it in its "
                    "data ledger (another fingerprint): the data, or a flag that shapes the stream, changed"
                )
        if quarantine:
            self._quarantine(step)

    def _quarantine(self, step: int) -> None:
        """The last step's documents, every rank's, never fed again (a collective: every rank calls it)."""
        mine = self.last.get("documents", [])
        everyone = [mine]
        if dist.is_available() and dist.is_initialized() and world_size() > 1:
            everyone = [None] * world_size()
            dist.all_gather_object(everyone, mine)
        documents = sorted({(name, record) for part in everyone for name, record in part})
        if not documents or not hasattr(self.batches, "add_quarantine"):
            return
        self.batches.add_quarantine(documents)
        print_main(
            f"step {step}: its {len(documents)} documents are quarantined: not fed again in this run (the list is "
            "saved with each checkpoint's data state; scripts/show_batch.py --quarantine exports it)"
        )

    def __enter__(self) -> DataLedger:
        return self

    def __exit__(self, *exc_info) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
