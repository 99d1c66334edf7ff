"""The test harness: one way to launch the real scripts (in-process for one process, torchrun for
several, free ports always), shared fixtures, and TensorBoard scalars and W&B offline runs read back.

Every test that starts a process must be marked `multiprocess` (the launcher checks), so
`make test-fast` (`-m "not multiprocess"`) really runs in one process.
"""

from __future__ import annotations

import json
import os
import runpy
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import time
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from io import StringIO
from pathlib import Path

import psutil
import pytest

from llama_recipe.distributed import free_port
from llama_recipe.metrics import read_scalars  # noqa: F401  (the tests import it from here)

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data" / "redpajama-sample"
INSTRUCT_DATA = REPO / "data" / "self_instruct"
TOKENIZER = str(REPO / "data" / "llama-tokenizer")
PYTHON_BIN = Path(sys.executable).parent
TINY_RUN = ["-c", "tiny", "-d", str(DATA), "-l", "128", "-b", "2", "-s", "0", "--lr", "5e-3"]
_current_markers: set[str] = set()


def pytest_runtest_setup(item):
    """Remember the running test's markers (before any of its fixtures), so `launch` can refuse an unmarked test."""
    _current_markers.clear()
    _current_markers.update(m.name for m in item.iter_markers())


@pytest.fixture(autouse=True)
def _restore_torch_state():
    import torch

    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture(scope="session")
def tokenizer():
    """The shipped LLaMA tokenizer, loaded once."""
    from llama_recipe.data import load_tokenizer

    return load_tokenizer(TOKENIZER)


def write_jsonl(path: Path, rows: list[dict | str]) -> Path:
    """One JSON object per line; plain strings become {"text": ..., "meta": {"n": i}} (RedPajama's layout)."""
    lines = [
        json.dumps(row if isinstance(row, dict) else {"text": row, "meta": {"n": i}}) for i, row in enumerate(rows)
    ]
    path.write_text("".join(line + "\n" for line in lines))
    return path


def script_env(**extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    env["PATH"] = f"{PYTHON_BIN}{os.pathsep}{env.get('PATH', '')}"  # torchrun / colossalai of this venv
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if var not in extra:
            env.pop(var, None)
    return env


def _command(script: str, args: list[str], nproc: int, launcher: str, launcher_args: list[str]) -> list[str]:
    if launcher == "colossalai":  # the cluster launcher (--hostfile etc. in launcher_args)
        return [str(PYTHON_BIN / "colossalai"), "run", "--nproc_per_node", str(nproc), "--master_port",
                str(free_port()), *launcher_args, script, *args]  # fmt: skip
    if nproc > 1:
        rendezvous = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
        return [
            str(PYTHON_BIN / "torchrun"),
            *rendezvous,
            "--nnodes",
            "1",
            "--nproc_per_node",
            str(nproc),
            script,
            *args,
        ]
    return [sys.executable, script, *args]


def launch(
    script: str,
    args: list[str],
    nproc: int = 1,
    env: dict | None = None,
    timeout: int = 300,
    launcher: str = "torchrun",
    log: Path | None = None,
    launcher_args: list[str] | None = None,
):
    """Run a script of the repo as users do: `python script` for one process, torchrun (or
    `colossalai run`) for several, on free loopback ports. With `log`, start it in the background
    and return the Popen (output to `log`); otherwise wait and return the CompletedProcess."""
    assert "multiprocess" in _current_markers, "a test that launches processes must be marked multiprocess"
    cmd = _command(script, args, nproc, launcher, launcher_args or [])
    if log is not None:
        return subprocess.Popen(cmd, cwd=REPO, env=env or script_env(), stdout=log.open("w"), stderr=subprocess.STDOUT)
    return subprocess.run(cmd, cwd=REPO, env=env or script_env(), capture_output=True, text=True, timeout=timeout)


def signal_job(job: subprocess.Popen, sig: int) -> None:
    """Signal a launched job and every worker, as a scheduler does (torchrun starts workers in their own sessions).
    SIGKILL returns once every one of them is gone: a killed worker can take a moment to die (in the middle of a
    write), and its save-directory lock is released only then."""
    parent = psutil.Process(job.pid)
    processes = [*parent.children(recursive=True), parent]
    for process in processes:
        try:
            process.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    if sig == signal.SIGKILL:
        psutil.wait_procs(processes, timeout=60)


@pytest.fixture
def background_jobs():
    """Jobs a test starts in the background; whatever is still running at the end is killed."""
    jobs: list[subprocess.Popen] = []
    yield jobs
    for job in jobs:
        if job.poll() is None:
            signal_job(job, signal.SIGKILL)
            job.wait(timeout=60)


@dataclass
class InProcessRun:
    """What `run_in_process` returns: the exit code and output, as a subprocess would have them."""

    returncode: int
    stdout: str
    stderr: str


def run_in_process(script: str, args: list[str], env: dict[str, str] | None = None) -> InProcessRun:
    """Run a script of the repo (pretrain.py, scripts/export_hf.py, ...) in this process, as one
    rank: its own code from the top (`runpy`), without paying a new interpreter's imports. The
    environment variables a launch sets, the thread count and the process group are put back
    afterwards."""
    import torch
    import torch.distributed as dist

    keys = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", *(env or {})}
    saved = {k: os.environ.get(k) for k in keys}
    for key in saved:
        os.environ.pop(key, None)
    os.environ.update(env or {})  # e.g. WORLD_SIZE, as a launcher would set it
    threads, argv = torch.get_num_threads(), sys.argv
    torch.set_num_threads(1)  # as the launched scripts run (OMP_NUM_THREADS=1): the same arithmetic
    out, err, code = StringIO(), StringIO(), 0
    sys.argv = [str(REPO / script), *args]
    try:
        with redirect_stdout(out), redirect_stderr(err):
            runpy.run_path(str(REPO / script), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
        if dist.is_initialized():  # a failed run leaves its group (as a real process would at exit)
            dist.destroy_process_group()
        torch.set_num_threads(threads)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return InProcessRun(code, out.getvalue(), err.getvalue())


@contextmanager
def one_rank_process_group():
    """This process as a 1-rank ColossalAI process group (patches applied), for in-process checks."""
    import torch.distributed as dist

    from llama_recipe.distributed import launch as join_process_group

    saved = {k: os.environ.pop(k, None) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    try:
        join_process_group(seed=0)
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


def check_ok(proc) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    )


def expect_error_after_training(proc, *keywords: str, code: int) -> str:
    """A failure during training: the progress bar may precede it, but the error is the one last line
    starting with "error:", naming each keyword; no traceback."""
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error:") and sum(line.startswith("error:") for line in lines) == 1, proc.stderr
    for keyword in keywords:
        assert keyword in lines[-1], lines[-1]
    return lines[-1]


def expect_one_line_error(proc, *keywords: str, code: int = 2) -> str:
    """Bad input: exit code 2, exactly one line on stderr starting with "error:", naming each keyword; no traceback."""
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for keyword in keywords:
        assert keyword in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------
# A W&B offline run read back. wandb 0.31 has no Python reader of its run-<id>.wandb files (wandb-core,
# in Go, writes and syncs them), so the framing is read here: LevelDB's log format (32 KiB blocks,
# records cut into chunks behind 7-byte headers: CRC, length, type) after W&B's 7-byte file header;
# each record is wandb's own protobuf (wandb.proto.wandb_internal_pb2.Record).

WANDB_BLOCK, WANDB_CHUNK_HEADER = 32768, 7
FULL, LAST = 1, 4  # chunk types that end a record (FIRST = 2 and MIDDLE = 3 continue one)


@dataclass
class WandbRun:
    """What one offline run-<id>.wandb file holds: the run's id and config, and its logged rows."""

    run_id: str
    config: dict
    history: list[dict]  # one {key: value} per wandb.log call, W&B's own keys (_step, _runtime, ...) left out

    def scalars(self, tag: str) -> dict[int, float]:
        """{step: value} of one scalar, as metrics.read_scalars reads TensorBoard's."""
        return {row["step"]: row[tag] for row in self.history if tag in row}


def _wandb_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, pending, pos = [], b"", WANDB_CHUNK_HEADER
    while pos + WANDB_CHUNK_HEADER <= len(data):
        if WANDB_BLOCK - pos % WANDB_BLOCK < WANDB_CHUNK_HEADER:  # a block's tail too short for a header: padding
            pos += WANDB_BLOCK - pos % WANDB_BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + WANDB_CHUNK_HEADER])
        pending += data[pos + WANDB_CHUNK_HEADER : pos + WANDB_CHUNK_HEADER + length]
        pos += WANDB_CHUNK_HEADER + length
        if kind in (FULL, LAST):
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def read_wandb_run(run_file: Path) -> WandbRun:
    """One offline W&B run file (<dir>/wandb/offline-run-*/run-<id>.wandb) read back."""
    run_id, config, history = None, {}, []
    for record in _wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
            config |= {item.key: json.loads(item.value_json) for item in record.run.config.update}
        elif kind == "config":
            config |= {item.key: json.loads(item.value_json) for item in record.config.update}
        elif kind == "history":
            # (a key with a "/", as train/loss, comes as its parts)
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.append({key: value for key, value in row.items() if not key.startswith("_")})
    config = {key: value for key, value in config.items() if not key.startswith("_")}  # (W&B's own _wandb)
    return WandbRun(run_id, config, history)


def wandb_run_files(directory: Path) -> list[Path]:
    """The offline W&B run files a run with its files in `directory` (-o) wrote, oldest first."""
    return sorted(directory.glob("wandb/offline-run-*/run-*.wandb"))


# ---------------------------------------------------------------------------------------------
# The plugin matrix: each layout trains once per session, shared by the tests that need it.

LAYOUTS = {
    "ddp": ["-p", "ddp", "--unfused_loss"],  # the plain loss; zero2 (the chunked one) must give its losses
    "zero2": ["-p", "zero2"],
    "zero2_cpu": ["-p", "zero2_cpu"],
    "tp2": ["-p", "hybrid_parallel", "--tp", "2"],
    "pp2": ["-p", "hybrid_parallel", "--pp", "2"],
}
DP_SIZE = {"ddp": 2, "zero2": 2, "zero2_cpu": 2, "tp2": 1, "pp2": 1}
STEPS, RESUME_FROM = 6, 3
# zero2 also serves the checkpoint tests: a checkpoint every step, the newest 4 kept (step-3 .. step-6)
SAVES = {"zero2": ["-i", "1", "--keep_last", "4"]}
LAUNCHER = {"ddp": "colossalai"}
HELD_OUT = REPO / "data" / "heldout" / "sherlock_holmes_1661.jsonl"
EVAL_DURING = [
    "--eval_data",
    str(HELD_OUT),
    "--eval_tokens",
    "512",
    "--eval_interval",
    str(RESUME_FROM),
]  # ddp's run goes through `colossalai run`, the cluster launcher


def launch_runs(runs: dict[str, list[str]], root: Path, script: str = "pretrain", nproc: int = 2, **launch_args):
    """Several `pretrain.py` (or `finetune.py`) runs one after another in ONE launch (2 processes
    unless said; tests/layouts_probe.py), each from its own flags alone (a fresh model, optimizer and
    data stream; a resume reads only its checkpoint): the interpreter's and ColossalAI's start-up is
    paid once. `launch_args` go to `launch` (launcher, env, launcher_args). Returns the
    CompletedProcess; `run_outputs` splits its stdout by run."""
    listed = root / "runs.json"  # a file: `colossalai run` splits arguments at spaces
    pairs = [item for name, args in runs.items() for item in (name, shlex.join(args))]
    listed.write_text(json.dumps({"script": script, "runs": pairs}))
    return launch("tests/layouts_probe.py", [str(root / "probe"), str(listed)], nproc=nproc, **launch_args)


def run_outputs(job) -> dict[str, str]:
    """launch_runs' stdout, by run name (each run's part starts at the probe's marker line)."""
    parts = job.stdout.split("=== run ")[1:]
    return dict(part.split("\n", 1) for part in parts)


@pytest.fixture(scope="session")
def layout_runs(tmp_path_factory):
    """`layout_runs(name)`: 6 steps of `pretrain.py` on 2 processes with a checkpoint at step 3, then
    a second run resuming from step 3 to step 6 (its flags from step-3's run.yaml: --config_file,
    with -f, -i 0 and its own -t typed), both in one launch (tests/layouts_probe.py: the second run
    starts from the checkpoint alone, in a fresh model, optimizer and data stream), and `tied_runs`'
    two. Runs once per layout, when first asked for."""
    cache = {}

    def get(layout: str) -> dict:
        if layout not in cache:
            root = tmp_path_factory.mktemp(layout)
            common = [*TINY_RUN, *LAYOUTS[layout], "-o", str(root / "ckpt"), "--max_steps", str(STEPS), *EVAL_DURING]
            saves = SAVES.get(layout, ["-i", str(RESUME_FROM)])
            resume = ["-i", "0", "-t", str(root / "tb_resumed"), "-f", str(root / "ckpt" / f"step-{RESUME_FROM}")]
            run_file = ["--config_file", str(root / "ckpt" / f"step-{RESUME_FROM}" / "run.yaml")]  # the other flags
            full_run, resumed_run = [*common, *saves, "-t", str(root / "tb")], [*run_file, *resume]
            job = launch_runs(
                {"full": full_run, "resumed": resumed_run, **tied_runs(root, LAYOUTS[layout])},
                root,
                launcher=LAUNCHER.get(layout, "torchrun"),
            )
            check_ok(job)
            cache[layout] = dict(
                root=root,
                launcher=LAUNCHER.get(layout, "torchrun"),
                stdout=job.stdout,
                losses=read_scalars(root / "tb"),
                resumed_losses=read_scalars(root / "tb_resumed"),
                evals=read_scalars(root / "tb", "eval/loss"),
                resumed_evals=read_scalars(root / "tb_resumed", "eval/loss"),
                tied_losses=read_scalars(root / "tied" / "tb"),
                tied_resumed_losses=read_scalars(root / "tied" / "tb_resumed"),
            )
        return cache[layout]

    return get


TIED_STEPS, TIED_RESUME_FROM = 3, 2


def tied_runs(root: Path, layout: list[str]) -> dict[str, list[str]]:
    """`tiny` with its output layer tied to the embeddings (as Llama 3.2 1B/3B), given as a config.json: 3 steps
    saving at step 2, and a run resuming from step 2 (test_tied_embeddings.py). They ride in the layout's launch."""
    from llama_recipe.model import MODEL_PRESETS

    tied = root / "tied"
    tied.mkdir()
    (tied / "config.json").write_text(json.dumps({**MODEL_PRESETS["tiny"], "tie_word_embeddings": True}))
    common = [*TINY_RUN, *layout, "-c", str(tied / "config.json"), "-o", str(tied / "ckpt")]
    common += ["--max_steps", str(TIED_STEPS)]
    resume = ["-f", str(tied / "ckpt" / f"step-{TIED_RESUME_FROM}"), "-i", "0", "-t", str(tied / "tb_resumed")]
    return {
        "tied": [*common, "-i", str(TIED_RESUME_FROM), "-t", str(tied / "tb")],
        "tied_resumed": [*common, *resume],
    }


def trainer_batches(tokenizer, dp_rank: int, dp_size: int, seq_len: int = 128, batch_size: int = 2):
    """The batches `pretrain.py` with TINY_RUN's data flags reads on this replica (its default seed and shuffle)."""
    from llama_recipe.config import TrainConfig
    from llama_recipe.data import build_pretrain_batches

    defaults = TrainConfig.for_script("pretrain")
    return build_pretrain_batches(
        str(DATA), tokenizer, seq_len, batch_size, dp_rank, dp_size,
        seed=defaults.training.seed, shuffle_buffer=defaults.data.shuffle_buffer,
    )  # fmt: skip


_RECORDS: dict[str, list[str]] = {}  # a data file's records (its non-blank lines), read once
_TOKENS: dict[tuple[str, int], list[int]] = {}  # a document's tokens, tokenized once


def ledger_lines(tensorboard_dir: Path, rank: int) -> list[dict]:
    """A rank's data ledger (<-t>/ledger/rank-<R>.jsonl), its lines in the order written."""
    return [json.loads(line) for line in (tensorboard_dir / "ledger" / f"rank-{rank}.jsonl").read_text().splitlines()]


def assert_ledger_line_is(entry: dict, batches: list[dict], tokenizer) -> None:
    """A ledger line is what the step trained on, checked against the batches themselves: its fingerprint
    is blake2b-64 of their input_ids, and its documents are exactly those whose tokens fill the rows, in
    order: each stretch of a row between two position restarts is the tokens at those positions of a
    listed document (read from its file, record = its non-blank line, and tokenized here)."""
    import hashlib

    from llama_recipe.data import tokenize_texts

    digest = hashlib.blake2b(digest_size=8)
    for batch in batches:
        digest.update(batch["input_ids"].numpy().tobytes())
    assert entry["fingerprint"] == digest.hexdigest(), entry["step"]
    for name, record in entry["documents"]:
        if name not in _RECORDS:
            _RECORDS[name] = [line for line in Path(name).read_text().splitlines() if line.strip()]
        if (name, record) not in _TOKENS:
            _TOKENS[(name, record)] = tokenize_texts(tokenizer, [json.loads(_RECORDS[name][record])["text"]])[0]
    tokens = {tuple(d): _TOKENS[tuple(d)] for d in entry["documents"]}
    found = []
    for batch in batches:
        for ids, positions in zip(batch["input_ids"].tolist(), batch["position_ids"].tolist(), strict=True):
            cuts = [i for i in range(1, len(ids)) if positions[i] != positions[i - 1] + 1] + [len(ids)]
            start = 0
            for end in cuts:
                first = positions[start]
                owner = [d for d, t in tokens.items() if t[first : first + end - start] == ids[start:end]]
                assert owner, f"step {entry['step']}: tokens {start}-{end} of a row are in none of its documents"
                found.append(owner[0])
                start = end
    assert [list(d) for d in dict.fromkeys(found)] == entry["documents"], entry["step"]


@pytest.fixture(scope="session")
def pretrained_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny LLaMA saved as a Hugging Face directory (safetensors + the shipped tokenizer), with
    weights drawn wide (std 0.5, not 0.02) so that its predictions are far from uniform: a check
    that scores the wrong token, or the right token at the wrong position, then gets another number."""
    import torch

    from llama_recipe.model import build_model, get_model_config

    config = get_model_config("tiny")
    config.initializer_range = 0.5
    torch.manual_seed(0)
    model = build_model(config, "sdpa", torch.float32)
    path = tmp_path_factory.mktemp("pretrained") / "tiny"
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


SSHD = "/usr/sbin/sshd"


def _ensure_sshd() -> None:
    if Path(SSHD).exists():
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("needs openssh-server (apt-get install openssh-server, as root)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=300)
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "openssh-server"]
    if subprocess.run(install, env=env, capture_output=True, timeout=600).returncode or not Path(SSHD).exists():
        pytest.skip("could not install openssh-server")


@dataclass
class SshHosts:
    """Two "hosts" on this machine, 127.0.0.2 and 127.0.0.3, behind a real sshd. `fault`: a shell
    snippet that 127.0.0.3's sessions source before running their command (an `export`, an `exec
    unshare -m ...` that mounts over a path): how a test makes that host differ. Empty: none."""

    hostfile: Path
    port: int
    env: dict
    fault: Path
    log: Path


@pytest.fixture(scope="module")
def two_ssh_hosts(tmp_path_factory):
    """sshd on 127.0.0.2 and 127.0.0.3 at a free port, a throwaway key in an ssh-agent; one per test module."""
    _ensure_sshd()
    ssh = tmp_path_factory.mktemp("ssh")
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh / name)], check=True)
    (ssh / "authorized_keys").write_text((ssh / "client.pub").read_text())
    fault, session = ssh / "fault.sh", ssh / "session.sh"
    fault.write_text("")
    session.write_text(f'. {fault}\nexec "$SHELL" -c "$SSH_ORIGINAL_COMMAND"\n')  # as sshd runs a command
    port = free_port()
    (ssh / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.2\nListenAddress 127.0.0.3\nHostKey {ssh / 'host'}\n"
        f"PidFile {ssh / 'sshd.pid'}\nAuthorizedKeysFile {ssh / 'authorized_keys'}\nPubkeyAuthentication yes\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
        f"StrictModes no\nUsePAM no\nMatch LocalAddress 127.0.0.3\n  ForceCommand sh {session}\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", str(ssh / "sshd_config")], stderr=(ssh / "sshd.log").open("w"))
    agent = subprocess.run(["ssh-agent", "-s"], capture_output=True, text=True, check=True).stdout
    agent_env = dict(part.split("=", 1) for part in agent.replace(";", "\n").split() if "=" in part)
    subprocess.run(["ssh-add", str(ssh / "client")], env={**os.environ, **agent_env}, check=True, capture_output=True)
    time.sleep(0.5)
    hostfile = ssh / "hosts.txt"
    hostfile.write_text("127.0.0.2\n127.0.0.3\n")
    # ssh (the doctor's, launch_common.sh's) checks host keys; these hosts' are known from a file of their own
    host_key = (ssh / "host.pub").read_text().split()[:2]
    (ssh / "known_hosts").write_text(
        "".join(f"[{ip}]:{port} {' '.join(host_key)}\n" for ip in ("127.0.0.2", "127.0.0.3"))
    )
    (ssh / "bin").mkdir()
    (ssh / "bin" / "ssh").write_text(f'#!/bin/sh\nexec /usr/bin/ssh -o UserKnownHostsFile={ssh / "known_hosts"} "$@"\n')
    (ssh / "bin" / "ssh").chmod(0o755)
    env = script_env(**{k: v for k, v in agent_env.items() if k.startswith("SSH_")})
    env["PATH"] = f"{ssh / 'bin'}{os.pathsep}{env['PATH']}"
    yield SshHosts(hostfile, port, env, fault, ssh / "sshd.log")
    sshd.terminate()
    subprocess.run(["kill", agent_env.get("SSH_AGENT_PID", "0")], capture_output=True)
