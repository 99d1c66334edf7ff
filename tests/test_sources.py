"""Where -d's documents come from. Known hub corpora are read through their data files: the file
selection runs on local copies laid out as each repository is (their public file listings), and
the rows stream through the same reader (.jsonl.zst, .json.gz and Parquet included). A repository
built around a loading script resolves to its data files; mixtures can be named by a row field;
the hub's errors (missing, gated, offline, transient) are one line, over real HTTP on loopback."""

from __future__ import annotations

import gzip
import json
import time

import pytest
from conftest import expect_one_line_error, launch, run_in_process, script_env
from fake_hub import FakeHub

from llama_recipe import sources
from llama_recipe.data import DocumentStream, build_pretrain_batches, load_tokenizer
from llama_recipe.errors import UsageError
from llama_recipe.sources import resolve_source, select_data_files

RP_SAMPLE = "togethercomputer/RedPajama-Data-1T-Sample"
RP_FILES = [f"{s}_sample.jsonl" for s in ("arxiv", "book", "c4", "github", "stackexchange", "wikipedia")] + [
    f"cc_{d}_sample.jsonl" for d in ("2019-30", "2020-05", "2021-04", "2022-05", "2023-06")
]
# Each repository's layout (a few files of each kind), as its public file listing shows it.
LAYOUTS = {
    RP_SAMPLE: [".gitattributes", "README.md", "RedPajama-Data-1T-Sample.py", *RP_FILES],
    "cerebras/SlimPajama-627B": [
        ".gitattributes", "README.md", "train/chunk1/example_train_0.jsonl.zst", "train/chunk1/example_train_1.jsonl.zst",
        "train/chunk2/example_train_0.jsonl.zst", "validation/chunk1/example_holdout_0.jsonl.zst",
        "test/chunk1/example_holdout_0.jsonl.zst",
    ],
    "HuggingFaceFW/fineweb-edu": [
        "README.md", "sample/10BT/000_00000.parquet", "sample/10BT/001_00000.parquet", "sample/100BT/000_00000.parquet",
        "data/CC-MAIN-2024-10/000_00000.parquet", "data/CC-MAIN-2013-20/train-00000-of-00002.parquet",
    ],
    "allenai/c4": [
        "README.md", "en/c4-train.00000-of-01024.json.gz", "en/c4-train.00001-of-01024.json.gz",
        "en/c4-validation.00000-of-00008.json.gz", "en.noblocklist/c4-train.00000-of-01024.json.gz",
        "realnewslike/c4-train.00000-of-00512.json.gz",
    ],
    "DKYoon/SlimPajama-6B": [
        "README.md", "data/train-00000-of-00048.parquet", "data/validation-00000-of-00001.parquet",
        "data/test-00000-of-00001.parquet",
    ],
}  # fmt: skip
SELECTED = {
    (RP_SAMPLE, None): sorted(RP_FILES),
    ("cerebras/SlimPajama-627B", None): [p for p in LAYOUTS["cerebras/SlimPajama-627B"] if p.startswith("train/")],
    ("HuggingFaceFW/fineweb-edu", None): ["data/CC-MAIN-2013-20/train-00000-of-00002.parquet", "data/CC-MAIN-2024-10/000_00000.parquet"],
    ("HuggingFaceFW/fineweb-edu", "sample-10BT"): ["sample/10BT/000_00000.parquet", "sample/10BT/001_00000.parquet"],
    ("allenai/c4", None): ["en/c4-train.00000-of-01024.json.gz", "en/c4-train.00001-of-01024.json.gz"],
    ("allenai/c4", "realnewslike"): ["realnewslike/c4-train.00000-of-00512.json.gz"],
    ("DKYoon/SlimPajama-6B", None): ["data/train-00000-of-00048.parquet"],
}  # fmt: skip
SLIMPAJAMA_SLICES = ["RedPajamaCommonCrawl", "RedPajamaBook", "RedPajamaArXiv"]


def _rows(path: str) -> list[dict]:
    """The documents each data file of a layout holds: a few, each naming the file and its slice."""
    slice_name = SLIMPAJAMA_SLICES[len(path) % 3]
    return [{"text": f"document {i} of {path}", "meta": {"redpajama_set_name": slice_name}} for i in range(3)]


def _write(path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(row) + "\n" for row in rows).encode()
    if path.name.endswith(".zst"):
        import zstandard

        path.write_bytes(zstandard.ZstdCompressor().compress(lines))
    elif path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(lines))
    elif path.name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.name.endswith(".jsonl"):
        path.write_bytes(lines)
    else:  # README, scripts, .gitattributes
        path.write_text("not data")


@pytest.fixture
def local_copy(tmp_path):
    """`local_copy(repo)`: the repository's layout written under tmp_path, and the lister/locator
    that let resolve_source read it as it would the hub."""

    def make(repo: str) -> dict:
        root = tmp_path / repo.replace("/", "__")
        for path in LAYOUTS[repo]:
            _write(root / path, _rows(path))
        return dict(list_files=lambda name: LAYOUTS[name], file_url=lambda name, path: str(root / path))

    return make


@pytest.mark.parametrize(
    "repo,config", list(SELECTED), ids=[f"{r.split('/')[1]}-{c or 'default'}" for r, c in SELECTED]
)
def test_known_layouts_select_their_training_files(repo, config):
    assert select_data_files(repo, LAYOUTS[repo], None, config) == SELECTED[repo, config]


@pytest.mark.parametrize(
    "repo,config", list(SELECTED), ids=[f"{r.split('/')[1]}-{c or 'default'}" for r, c in SELECTED]
)
def test_known_layouts_stream_their_documents(local_copy, tokenizer, repo, config):
    """From a local copy of the layout, through the hub path's selection and the same readers."""
    source = resolve_source(repo, data_config=config, **local_copy(repo))
    assert [f.split("__", 1)[1].split("/", 1)[1] for f in source.files] == SELECTED[repo, config]
    texts = [tokenizer.decode(doc["input_ids"][1:-1]) for doc in DocumentStream(source, tokenizer, 0, 1)]
    assert texts == [row["text"] for path in SELECTED[repo, config] for row in _rows(path)]


def test_a_script_only_repository_resolves_to_its_data_files(local_copy):
    """RedPajama-Data-1T-Sample is built around a loading script, which datasets 4+ refuse to run."""
    source = resolve_source(RP_SAMPLE, **local_copy(RP_SAMPLE))
    assert len(source.files) == 11 and not any(f.endswith(".py") for f in source.files)


def test_other_repositories_use_data_files_outside_held_out_folders_or_data_dir():
    listing = [
        "README.md",
        "loader.py",
        "train/a.jsonl",
        "train/b.jsonl",
        "valid/c.jsonl",
        "test.jsonl",
        "eval/x.parquet",
    ]
    assert select_data_files("someone/corpus", listing, None, None) == ["train/a.jsonl", "train/b.jsonl"]
    assert select_data_files("someone/corpus", listing, "valid", None) == ["valid/c.jsonl"]
    with pytest.raises(UsageError, match="--data_config 'nope'.*sample-10BT"):
        select_data_files("HuggingFaceFW/fineweb-edu", [], None, "nope")


def test_a_mixture_named_by_a_row_field_hits_its_shares(tmp_path, tokenizer):
    """SlimPajama-style files mix slices; meta.redpajama_set_name says which. Token shares within 1%
    over more than 100K tokens, though the slices' natural sizes differ 10x. A slice no row names is
    one line, not an endless search."""
    for f in range(4):
        rows = [
            {"text": f"file {f} row {i}: " + " ".join(["text"] * (20 + i % 37)),
             "meta": {"redpajama_set_name": SLIMPAJAMA_SLICES[0 if i % 6 else 1 + i % 4 // 2]}}
            for i in range(300)
        ]  # fmt: skip
        _write(tmp_path / "train" / f"chunk{f}" / "example_train_0.jsonl.zst", rows)
    source = resolve_source(
        "cerebras/SlimPajama-627B",
        list_files=lambda name: [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.zst")],
        file_url=lambda name, path: str(tmp_path / path),
    )
    batches = build_pretrain_batches(
        source, tokenizer, 256, 8, 0, 1, "cc=0.5,book=0.3,arxiv=0.2", seed=1, shuffle_buffer=64
    )
    for _ in range(60):  # 60 x 8 x 256 = 123K tokens
        batches.next_batch()
    mixer = batches.rows.documents
    total = sum(mixer.tokens.values())
    assert total >= 100_000
    for name, weight in {"cc": 0.5, "book": 0.3, "arxiv": 0.2}.items():
        assert mixer.tokens[name] / total == pytest.approx(weight, abs=0.01), mixer.tokens
    missing = build_pretrain_batches(source, tokenizer, 256, 8, 0, 1, "cc=0.5,github=0.5", seed=1, shuffle_buffer=64)
    with pytest.raises(UsageError, match="slice 'github' has no documents"):
        for _ in range(10):
            missing.next_batch()


# ---------------------------------------------------------------------------------------------
# The hub's answers, over HTTP on loopback


@pytest.fixture
def hub(monkeypatch):
    """A FakeHub with a public, a gated and a flaky repository, as HF_ENDPOINT; fast retries."""
    monkeypatch.setattr(sources, "HUB_BACKOFF_S", 0.05)
    sources.list_hub_files.cache_clear()  # one listing per repository per process: each test its own hub
    monkeypatch.delenv("HF_TOKEN", raising=False)
    repos = {
        "open/corpus": ["README.md", "train/a.jsonl.zst"],
        "closed/corpus": ["data/a.parquet"],
        "flaky/corpus": ["a.jsonl"],
    }
    with FakeHub(repos, gated={"closed/corpus"}, fail_first={"flaky/corpus": 2}) as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        yield fake


def test_hub_files_are_listed_and_addressed_over_hf(hub):
    source = resolve_source("open/corpus")
    assert source.files == ("hf://datasets/open/corpus/train/a.jsonl.zst",)
    assert hub.requests[0][0].startswith("/api/datasets/open/corpus/tree/main")


def test_a_missing_repository_is_one_line(hub):
    with pytest.raises(UsageError, match="no dataset 'no/such'.*-d with local"):
        resolve_source("no/such")


def test_a_gated_repository_needs_hf_token_which_is_sent_but_never_shown(hub, monkeypatch):
    with pytest.raises(UsageError, match="gated.*HF_TOKEN"):
        resolve_source("closed/corpus")
    monkeypatch.setenv("HF_TOKEN", "hf_secret_marker_123")
    assert resolve_source("closed/corpus").files == ("hf://datasets/closed/corpus/data/a.parquet",)
    assert hub.requests[-1][1] == "Bearer hf_secret_marker_123"


def test_transient_errors_are_retried_then_one_line(hub, monkeypatch):
    assert resolve_source("flaky/corpus").files == ("hf://datasets/flaky/corpus/a.jsonl",)
    assert [p for p, _ in hub.requests].count("/api/datasets/flaky/corpus/tree/main?recursive=True&expand=False") == 3
    hub.fail_first["flaky/corpus"] = 10  # more than HUB_ATTEMPTS
    sources.list_hub_files.cache_clear()
    with pytest.raises(UsageError, match="could not reach the Hugging Face hub.*503"):
        resolve_source("flaky/corpus")


def test_an_unreachable_hub_is_one_line_in_seconds(monkeypatch):
    """A refused connection is not worth retrying: an offline machine learns at once."""
    from llama_recipe.distributed import free_port

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    sources.list_hub_files.cache_clear()
    started = time.perf_counter()
    with pytest.raises(UsageError, match="could not reach the Hugging Face hub.*offline"):
        resolve_source("any/corpus")
    assert time.perf_counter() - started < 5


@pytest.mark.multiprocess
def test_pretrain_refuses_gated_and_offline_hub_names_in_one_line(tmp_path):
    """Through pretrain.py itself, in real processes: exit 2, one line, nothing written, the token never printed."""
    args = ["-c", "tiny", "-p", "ddp", "-d", "closed/corpus", "--max_steps", "2", "-o", str(tmp_path / "o"), "-t", ""]
    with FakeHub({"closed/corpus": ["data/a.parquet"]}, gated={"closed/corpus"}) as fake:
        proc = launch("pretrain.py", args, env=script_env(HF_ENDPOINT=fake.url), timeout=120)
    expect_one_line_error(proc, "gated", "HF_TOKEN")
    started = time.perf_counter()
    offline = launch("pretrain.py", args, env=script_env(HF_HUB_OFFLINE="1", HF_TOKEN="hf_secret_marker_123"))
    expect_one_line_error(offline, "HF_HUB_OFFLINE", "-d with local")
    assert time.perf_counter() - started < 60 and "hf_secret_marker_123" not in offline.stderr + offline.stdout
    assert not (tmp_path / "o").exists()


def test_hub_names_are_checked_before_anything_is_written(tmp_path, hub):
    args = [
        "-c",
        "tiny",
        "-p",
        "ddp",
        "-d",
        "no/such",
        "--max_steps",
        "2",
        "-o",
        str(tmp_path / "o"),
        "-t",
        str(tmp_path / "tb"),
    ]
    expect_one_line_error(run_in_process("pretrain.py", args), "no dataset 'no/such'")
    assert not (tmp_path / "o").exists() and not (tmp_path / "tb").exists()


@pytest.mark.parametrize(
    "name, local",
    [
        ("data/redpajama-sampel", True),
        ("./corpus", True),
        ("~/corpus", True),
        ("a/b/c", True),
        ("someorg/some-corpus", False),
        ("c4", False),
    ],
)
def test_what_reads_as_a_local_path(monkeypatch, name, local):
    from conftest import REPO

    monkeypatch.chdir(REPO)  # where data/ exists
    assert sources.looks_like_a_path(name) is local


def test_a_mistyped_local_path_is_said_not_to_exist_at_once(tmp_path, monkeypatch):
    """`-d data/redpajama-sampel` and `--tokenizer data/llama-tokenizr`, where data/ exists: one line
    saying the path does not exist, with the near name, never "could not reach the hub" (nor its retries)."""
    from conftest import DATA, REPO

    monkeypatch.chdir(REPO)
    started = time.perf_counter()
    args = ["-c", "tiny", "-p", "ddp", "--max_steps", "1", "-o", str(tmp_path / "o"), "-t", str(tmp_path / "tb")]
    proc = run_in_process("pretrain.py", [*args, "-d", "data/redpajama-sampel"])
    expect_one_line_error(proc, "-d data/redpajama-sampel does not exist", "data/redpajama-sample?", "pass -d")
    proc = run_in_process("pretrain.py", [*args, "-d", str(DATA), "--tokenizer", "data/llama-tokenizr"])
    expect_one_line_error(proc, "--tokenizer data/llama-tokenizr does not exist", "data/llama-tokenizer?")
    with pytest.raises(UsageError, match="does not exist"):  # prepare_data.py and serve.py load it so too
        load_tokenizer("data/llama-tokenizr")
    assert time.perf_counter() - started < 30 and not any(tmp_path.iterdir())
