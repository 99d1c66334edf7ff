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
