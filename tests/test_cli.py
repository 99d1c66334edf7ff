"""The command line: parsers generated from the config fields, per-script spellings and defaults, and
a README whose flag tables and code map cannot drift from the code."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest
from conftest import REPO
from test_structure import import_graph

from llama_recipe.cli import build_parser, parse_args
from llama_recipe.config import ALL_SCRIPTS, SECTIONS, TrainConfig
from llama_recipe.errors import UsageError

README = (REPO / "README.md").read_text()
with_tables = runpy.run_path(str(REPO / "scripts" / "flag_tables.py"))["with_tables"]


@pytest.mark.parametrize("page,everything", [("README.md", False), ("docs/flags.md", True)])
def test_the_flag_tables_are_the_parsers(page, everything):
    """scripts/flag_tables.py regenerates them; any flag added, renamed or re-defaulted without it fails here."""
    text = (REPO / page).read_text()
    assert "<!-- flags:pretrain -->" in text and "<!-- flags:benchmark -->" in text
    assert with_tables(text, everything) == text, "run: python scripts/flag_tables.py"


@pytest.mark.parametrize("script", ["pretrain", "finetune", "eval", "benchmark"])
def test_help_shows_each_default(script, monkeypatch):
    """--help appends `(default: X)` to every flag that has a value by default, and says nothing for
    a flag that is off or unset (the flag tables keep their own default column: the test above)."""
    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag: argparse wraps at the terminal's width
    parser = build_parser(script)
    shown = parser.format_help()
    assert "(default: None)" not in shown and "(default: False)" not in shown
    for action in parser._actions:
        if action.default is not None and action.default is not False and action.dest != "help":
            assert f"{action.help.replace('%%', '%')} (default: {action.default})" in shown, action.dest
    lr = {"pretrain": "0.0003", "finetune": "2e-05"}.get(script)
    assert lr is None or f"peak learning rate (default: {lr})" in shown


def test_readme_code_map_lists_every_module_below_what_it_imports():
    block = README.split("<!-- codemap -->", 1)[1].split("<!-- /codemap -->", 1)[0]
    listed = re.findall(r"^\| `(\w+)\.py` \|", block, re.M)
    modules = {p.stem for p in (REPO / "llama_recipe").glob("*.py") if p.stem != "__init__"}
    assert sorted(listed) == sorted(modules)
    position = {name: i for i, name in enumerate(listed)}
    for module, deps in import_graph().items():
        if module in position:
            above = [d for d in deps if position[d] > position[module]]
            assert not above, f"{module} imports {above}, listed below it in the README's code map"


def test_readme_is_a_front_door():
    assert len(README.splitlines()) <= 275


@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_every_config_field_is_one_flag_or_a_setting(script):
    """The parser's destinations are config fields; parse -> config -> flat dict round-trips."""
    dests = {a.dest for a in build_parser(script)._actions if a.dest != "help"}
    fields = set(TrainConfig().to_dict())
    assert dests <= fields
    assert set(TrainConfig.for_script(script).to_dict()) == fields
    args = ["--model_path", "m"] if script in ("finetune", "eval") else []
    cfg = parse_args(script, args)
    assert all(isinstance(getattr(cfg, name), section) for name, section in SECTIONS.items())


def test_per_script_defaults_live_in_the_config():
    pretrain, finetune = TrainConfig.for_script("pretrain"), TrainConfig.for_script("finetune")
    assert (pretrain.optim.lr, finetune.optim.lr) == (3e-4, 2e-5)
    assert (pretrain.optim.weight_decay, finetune.optim.weight_decay) == (0.1, 0.0)
    assert finetune.data.dataset == "yizhongw/self_instruct" and finetune.checkpoint.save_dir == "checkpoint-finetune"
    assert parse_args("finetune", ["--model_path", "m"]).optim.lr == 2e-5  # the parser takes them from there
    bench = TrainConfig.for_script("benchmark")
    assert bench.logging.time_breakdown and not pretrain.logging.time_breakdown


def test_reference_spellings_and_aliases():
    cfg = parse_args("pretrain", ["--weigth_decay", "0.2", "--gradient_clipping", "0.5", "--gradient_checkpoint"])
    assert (cfg.optim.weight_decay, cfg.optim.grad_clip, cfg.model.grad_checkpoint) == (0.2, 0.5, True)
    finetune = parse_args("finetune", ["--model_path", "m", "--pack_examples", "-t", ""])
    assert finetune.model.document_attention and finetune.logging.tensorboard_dir is None


def test_flags_a_script_does_not_offer_are_refused(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args("finetune", ["--model_path", "m", "-c", "tiny"])
    assert info.value.code == 2 and "unrecognized arguments: -c tiny" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args("finetune", [])  # --model_path is required
    assert "--model_path" in capsys.readouterr().err


def test_unknown_config_fields_are_a_type_error():
    with pytest.raises(TypeError, match="nonsense"):
        TrainConfig.for_script("pretrain", nonsense=1)


def test_plugin_names_outside_the_registry_are_one_line():
    from llama_recipe.plugins import plugin_spec

    with pytest.raises(UsageError, match="unknown plugin 'fsdp'; choose one of gemini, gemini_auto, zero2"):
        plugin_spec("fsdp")


def test_each_run_has_its_own_tensorboard_directory_in_its_save_dir():
    """-t defaults to tensorboard/ in -o: pretraining and finetuning (any two -o) never share one,
    a resume in the same -o continues it; an explicit -t wins, -t '' (or no -o) writes none."""

    def tensorboard(script: str, *args: str) -> str | None:
        return parse_args(
            script, [*args, *(["--model_path", "m"] if script == "finetune" else [])]
        ).logging.tensorboard_dir

    assert tensorboard("pretrain") == str(Path("checkpoint", "tensorboard"))
    assert tensorboard("finetune") == str(Path("checkpoint-finetune", "tensorboard"))
    assert tensorboard("pretrain", "-o", "runs/a") == str(Path("runs", "a", "tensorboard"))
    assert tensorboard("pretrain", "-o", "runs/a", "-t", "tb") == "tb"
    assert tensorboard("pretrain", "-o", "runs/a", "-t", "") is None
    assert tensorboard("pretrain", "-o", "") is None


# ---------------------------------------------------------------------------------------------
# --config_file: run files (each checkpoint's run.yaml round-trips: test_checkpoints.py)


def _run_file(tmp_path: Path, text: str, name: str = "run.yaml") -> str:
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


@pytest.mark.parametrize("name", ["run.yaml", "run.toml"])
def test_a_run_files_values_reach_the_config_and_the_command_line_wins(tmp_path, name):
    yaml_text = (
        "max_steps: 100\nplugin: hybrid_parallel\ntp: 2\nlr: 1e-3\ngradient_checkpoint: true\n"
        "num_layers_per_stage: [1, 3]\nbatch_size: 4\ntensorboard_dir: null\n"
    )
    toml_text = (
        'max_steps = 100\nplugin = "hybrid_parallel"\ntp = 2\nlr = 1e-3\ngradient_checkpoint = true\n'
        "num_layers_per_stage = [1, 3]\nbatch_size = 4\n"
    )
    path = _run_file(tmp_path, yaml_text if name.endswith(".yaml") else toml_text, name)
    cfg = parse_args("pretrain", ["--config_file", path, "-b", "8"])
    assert cfg.training.max_steps == 100 and cfg.parallel.plugin == "hybrid_parallel" and cfg.parallel.tp == 2
    assert cfg.optim.lr == 1e-3 and cfg.model.grad_checkpoint and cfg.parallel.num_layers_per_stage == (1, 3)
    assert cfg.training.batch_size == 8  # the command line wins
    assert cfg.checkpoint.config_file == path
    if name.endswith(".yaml"):
        assert cfg.logging.tensorboard_dir is None  # null: as -t '' (off), not the default
    untouched = TrainConfig.for_script("pretrain").to_dict()
    changed = {k for k, v in cfg.to_dict().items() if v != untouched[k]}
    assert changed - {"tensorboard_dir"} == {
        "max_steps", "plugin", "tp", "lr", "grad_checkpoint", "num_layers_per_stage", "batch_size", "config_file"
    }  # fmt: skip


def test_a_run_file_can_give_a_required_flag(tmp_path):
    """finetune.py's --model_path is required: the file's counts (argparse sees it as typed)."""
    path = _run_file(tmp_path, "model_path: some/model\npack_examples: true\n")
    cfg = parse_args("finetune", ["--config_file", path])
    assert cfg.model.model_path == "some/model" and cfg.model.document_attention  # derived as from the flag


@pytest.mark.parametrize(
    "script,text,expected",
    [
        ("benchmark", "num_steps: 5\nplugin: none\nzero: 1\n", {"max_steps": 5, "plugin": "none", "zero_stage": 1}),
        ("eval", "model_path: m\ntask: cloze\nlimit: 3\n", {"model_path": "m", "task": "cloze", "limit": 3}),
    ],
)
def test_every_script_reads_run_files_in_its_own_spellings(tmp_path, script, text, expected):
    """benchmark.py's --num_steps and --zero are its spellings of --max_steps and --zero_stage."""
    values = parse_args(script, ["--config_file", _run_file(tmp_path, text)]).to_dict()
    assert {k: values[k] for k in expected} == expected


@pytest.mark.parametrize(
    "text,words",
    [
        ("max_stepz: 3\n", ["unknown key 'max_stepz'", "pretrain.py has no --max_stepz"]),
        ("task: cloze\n", ["unknown key 'task'"]),  # eval.py's flag, not pretrain.py's
        ("seed: two\n", ["seed", "invalid int value: 'two'"]),
        ("max_steps: 1.5\n", ["max_steps", "invalid int value: '1.5'"]),
        ("plugin: nonsense\n", ["plugin", "invalid choice: 'nonsense'", "zero2"]),
        ("num_layers_per_stage: [a, 2]\n", ["num_layers_per_stage", "comma-separated layer counts"]),
        ("grad_checkpoint: 1\n", ["grad_checkpoint", "true or false"]),
        ("seed: true\n", ["seed", "takes a value"]),
        ("- max_steps\n", ["must map flag names to values"]),
        ("max_steps: [1\n", ["not valid YAML", "line 2"]),
    ],
)
def test_a_bad_run_file_is_a_usage_error_naming_the_file(tmp_path, text, words):
    path = _run_file(tmp_path, text)
    with pytest.raises(UsageError) as error:
        parse_args("pretrain", ["--config_file", path, "--max_steps", "2"])
    message = str(error.value)
    assert "\n" not in message and path in message and all(w in message for w in words), message


@pytest.mark.parametrize("layout", ["ddp", "zero2", "tp2", "pp2", "everything"])
def test_run_file_text_reads_back_as_the_same_config(tmp_path, layout):
    """What a checkpoint's run.yaml holds (checkpoint_io.run_file_text) parses back to the run's config,
    less what acts once as a run starts (-f, --reset_*) and where the flags came from."""
    from conftest import LAYOUTS, TINY_RUN

    from llama_recipe.checkpoint_io import run_file_text

    extra = ["-o", str(tmp_path / "o"), "--lr", "3.14e-4", "--adam_eps", "1e-8", "--max_steps", "7", "-t", ""]
    extra += ["--data_mix", "a=1,b=2", "--num_layers_per_stage", "1,3", "--on_spike", "skip", "-g", "-x", "fp32"]
    extra += ["-f", str(tmp_path / "o" / "step-3"), "--reset_optimizer", "--replace_checkpoints"]
    args = [*TINY_RUN, *(LAYOUTS.get(layout, []) if layout != "everything" else extra)]
    cfg = parse_args("pretrain", args)
    path = _run_file(tmp_path, run_file_text(cfg, "pretrain"))
    again = parse_args("pretrain", ["--config_file", path]).to_dict()
    once = {"load": None, "reset_optimizer": False, "replace_checkpoints": False}  # act once a run starts
    assert {k: again[k] for k in once} == once and again["config_file"] == path
    expected = {k: v for k, v in cfg.to_dict().items() if k not in {*once, "config_file"}}
    assert {k: v for k, v in again.items() if k not in {*once, "config_file"}} == expected
    if layout == "zero2":  # -t at its default `<-o>/tensorboard` follows -o, as on the command line
        moved = parse_args("pretrain", ["--config_file", path, "-o", str(tmp_path / "elsewhere")])
        assert moved.logging.tensorboard_dir == str(tmp_path / "elsewhere" / "tensorboard")
