"""The offline GPU kit, on this machine: `scripts/gpu_wheelhouse.sh --from-installed` builds a
wheelhouse for this Python with no index at all, `scripts/gpu_check.sh --wheelhouse DIR --install-only`
installs it with `--no-index` into a fresh venv that has only torch (as a node has its own), and there
every llama_recipe module imports and pretrain.py trains. Also the rules that leave packages to the node
(`--node-freeze`), on the real metadata of this environment."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DATA, REPO, check_ok, read_scalars
from packaging.markers import default_environment  # not pip's copy: importing pip in pytest's process
from packaging.requirements import Requirement  # turns off setuptools' distutils shim, which torch.compile's
from packaging.utils import canonicalize_name  # C++ builds (tests/test_compile.py) need

_spec = importlib.util.spec_from_file_location("wheelhouse", REPO / "scripts" / "wheelhouse.py")
wheelhouse = sys.modules["wheelhouse"] = importlib.util.module_from_spec(_spec)  # a script, not a module of ours
_spec.loader.exec_module(wheelhouse)

PINS = wheelhouse.read_pins(REPO / "requirements-gpu.txt") | wheelhouse.read_pins(REPO / "requirements-colossalai.txt")
PINS.pop("torch")


def offline_env(**extra: str) -> dict:
    """No index, no pip configuration (this machine's local indexes and find-links stay unused)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k not in ("PYTHONPATH", "RANK")}
    return dict(env, PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", OMP_NUM_THREADS="1", **extra)


def closure(*names: str) -> set[str]:
    """These installed distributions and everything they require here, transitively."""
    seen, todo = set(), [canonicalize_name(n) for n in names]
    while todo:
        if (name := todo.pop()) not in seen:
            seen.add(name)
            reqs = map(Requirement, importlib.metadata.distribution(name).requires or [])
            todo += [canonicalize_name(r.name) for r in reqs if not r.marker or r.marker.evaluate({"extra": ""})]
    return seen


def node_with_torch(folder: Path, venv: Path) -> Path:
    """A fresh venv whose only packages are torch, its requirements and pip, linked from this
    environment into `folder` and put on the venv's path by a .pth file, as a node has its own torch."""
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    folder.mkdir()
    for name in closure("torch", "pip"):
        dist = importlib.metadata.distribution(name)
        for top in {f.parts[0] for f in dist.files if f.parts[0] not in ("..", "__pycache__")}:
            if Path(dist.locate_file(top)).exists() and not (folder / top).exists():
                (folder / top).symlink_to(dist.locate_file(top))
    next(venv.glob("lib/python*/site-packages")).joinpath("node-torch.pth").write_text(f"{folder}\n")
    return venv / "bin" / "python"


@pytest.mark.wheelhouse
@pytest.mark.multiprocess
def test_the_wheelhouse_installs_offline_into_a_fresh_venv_and_the_recipe_trains_there(tmp_path):
    built = subprocess.run(["bash", "scripts/gpu_wheelhouse.sh", "--from-installed", "-o", str(tmp_path / "wh")],
        cwd=REPO, env=offline_env(PYTHON=sys.executable), capture_output=True, text=True, timeout=300)  # fmt: skip
    check_ok(built)
    wheels = {canonicalize_name(w.name.split("-")[0]) for w in (tmp_path / "wh").glob("*.whl")}
    listed = wheelhouse.read_pins(tmp_path / "wh" / "wheelhouse.txt")
    assert listed == {n: v for n, v in listed.items() if n in wheels} and set(listed) == wheels
    assert {n: listed.get(n) for n in PINS} == PINS  # every pin, at its version
    assert not {n for n in wheels if wheelhouse.NODE_PROVIDES.match(n)}  # no torch, nvidia-*, triton
    assert f"{len(wheels)} wheels" in built.stdout

    python = node_with_torch(tmp_path / "node-site", tmp_path / "venv")
    installed = subprocess.run(["bash", "scripts/gpu_check.sh", "--wheelhouse", str(tmp_path / "wh"), "--target",
        str(tmp_path / "site"), "--install-only"], cwd=REPO, env=offline_env(PYTHON=str(python)),
        capture_output=True, text=True, timeout=300)  # fmt: skip
    check_ok(installed)
    assert f"installed {len(wheels)} wheels into {tmp_path / 'site'}" in installed.stdout
    assert "requirement not met" not in installed.stdout  # every requirement of what it installed is there

    out, tb = tmp_path / "probe.json", tmp_path / "tb"
    args = ["-c", "tiny", "-p", "ddp", "-d", str(DATA), "-l", "128", "-b", "2", "-s", "0", "--max_steps", "2",
            "-o", str(tmp_path / "ckpt"), "-t", str(tb)]  # fmt: skip
    env = offline_env(
        PYTHONPATH=f"{tmp_path / 'site'}:{REPO}", PATH=f"{tmp_path / 'site' / 'bin'}:{os.environ['PATH']}"
    )
    probe = subprocess.run([str(python), "tests/wheelhouse_probe.py", str(out), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    check_ok(probe)
    report = json.loads(out.read_text())
    assert len(report["modules"]) > 25  # every llama_recipe module imported
    assert not [p for p in report["sys_path"] if p.startswith(sys.prefix)]  # this venv is not visible there
    origin = {name: Path(path).parts[len(tmp_path.parts)] if path.startswith(str(tmp_path)) else path
              for name, path in report["origins"].items()}  # fmt: skip
    torch_side = {top for name in closure("torch") for top in top_level_names(name)}
    assert {n for n, o in origin.items() if o == "node-site"} <= torch_side  # only torch came from the "node"
    assert {origin[n] for n in ("transformers", "colossalai", "fastapi", "tokenizers", "galore_torch")} == {"site"}
    # bitsandbytes (43 MB) is left out: ColossalAI's optimizers import without it, and 8-bit GaLore refuses
    assert "bitsandbytes" not in wheels and "bitsandbytes" not in origin
    assert any("without it" in line for line in report["applied"]), report["applied"]
    assert "need bitsandbytes, which is not installed" in report["galore_8bit"]
    assert {n for n, o in origin.items() if o not in ("site", "node-site")} == {"llama_recipe"}
    losses = read_scalars(tb)
    assert sorted(losses) == [1, 2] and all(0 < v < 20 for v in losses.values())
    assert (tmp_path / "ckpt" / "step-2").is_dir()
    for big in ("wh", "site"):  # 1.4 GB that pytest would otherwise keep for the last three sessions
        shutil.rmtree(tmp_path / big)


def top_level_names(name: str) -> set[str]:
    """The top-level import names an installed distribution provides."""
    tops = {f.parts[0] for f in importlib.metadata.distribution(name).files if f.parts[0] != ".."}
    return {t.removesuffix(".py") for t in tops if not t.endswith((".dist-info", ".pth", ".data"))}


def installed_dists() -> dict:
    dists = [(canonicalize_name(d.metadata["Name"]), d) for d in importlib.metadata.distributions()]
    return {name: wheelhouse.Dist(name, d.version, d.requires or []) for name, d in dists}


def test_what_the_node_has_is_left_out_unless_a_pin_or_a_requirement_needs_ours():
    dists, env = installed_dists(), default_environment()
    everything, _ = wheelhouse.walk(dists, list(PINS), set(), env)
    assert set(PINS) <= everything and "torch" not in everything and "pyarrow" in everything

    def split(node, loose=frozenset()):
        return wheelhouse.leave_to_node(dists, PINS, node, env, loose)

    needed, from_node = split({"numpy": PINS["numpy"], "tokenizers": "0.23.2", "transformers": "5.17.0"})
    assert "numpy" in from_node and "numpy" not in needed  # the pinned version is there
    assert {"tokenizers", "transformers"} <= needed - from_node  # another version: ours must win
    _, from_node = split({"numpy": "2.5.2"}, loose={"numpy"})
    assert "numpy" in from_node  # --loose numpy: any version the rest accepts
    needed, from_node = split({"fsspec": "0.0.1", "pyarrow": dists["pyarrow"].version})
    assert "fsspec" in needed and "fsspec" not in from_node  # datasets requires a newer fsspec than that
    assert "pyarrow" in from_node and "pyarrow" not in needed
    # a package left to the node takes along what only it required: here python-dateutil, tzdata
    assert [n for n in everything if any(canonicalize_name(r.name) == "tzdata" for r in
            wheelhouse.active_requirements(dists[n], "", env))] == ["python-dateutil"]  # fmt: skip
    needed, from_node = split({"python-dateutil": dists["python-dateutil"].version})
    assert "tzdata" in everything and not {"tzdata", "python-dateutil"} & needed
