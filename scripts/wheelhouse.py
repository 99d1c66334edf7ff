"""Build a wheelhouse: every package the recipe needs beside torch, as wheels for one Python version on
manylinux x86-64, so that a GPU node without internet installs it with `pip install --no-index`
(`scripts/gpu_check.sh --wheelhouse DIR`) next to its own CUDA torch. Run through
`scripts/gpu_wheelhouse.sh`; docs/gpu-validation.md has the whole procedure.

It needs only Python and pip (it runs on any connected machine, the recipe need not be installed):
1. pip resolves requirements-gpu.txt (minus torch) once, for the target Python and platform, and
   downloads that closure: one version of each package. torch is resolved as a stand-in wheel with no
   files and no dependencies ("the node's torch"), so neither torch nor what only torch needs
   (nvidia-*, triton, ...) is ever downloaded.
2. colossalai (an sdist) is built as a pure-Python wheel, without its dependency pins: it is installed
   `--no-deps`, as on CPU (requirements-colossalai.txt).
3. With --node-freeze (the node's `pip list --format=freeze`), what the node already has is left out:
   a package pinned in requirements-gpu.txt when the node has exactly that version, any other package
   when the node's version satisfies every requirement on it from what the wheelhouse keeps (and what
   only a package left to the node needed goes with it). --loose names pins to treat like the rest;
   --omit names pins to leave out altogether (with what only they need).

--from-installed takes the wheels from this interpreter's own environment instead of an index (each
installed distribution repacked as a wheel, uncompressed), for this interpreter's Python and platform:
the CPU test builds a wheelhouse that way with no index at all.
"""

from __future__ import annotations

import argparse
import base64
import email.parser
import functools
import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

try:  # `packaging` where it is installed, else pip's own copy: this script needs nothing but Python and pip
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version
except ImportError:  # (importing pip in a process turns off setuptools' distutils shim there: last resort)
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name
    from pip._vendor.packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
NODE_PROVIDES = re.compile(r"^(torch|triton|pytorch-triton|nvidia-.*|cuda-.*)$")  # the node's torch and its CUDA
NO_DEPS = "colossalai"  # installed without its dependency pins (torch<=2.5.1 and ~100 more)
# required by a pin, but unused by the recipe: bitsandbytes (43 MB) only for GaLore's 8-bit optimizers,
# which ColossalAI imports without it (llama_recipe/colossalai_patches.py)
NOT_NEEDED = {"bitsandbytes"}
STAND_IN_LABEL = "node"  # the stand-in torch is version <node's torch>+node; NOT_NEEDED's 0+node


def fail(message: str, code: int = 2) -> None:
    """One line on stderr; exit code 2 for bad input (as the recipe's scripts), 1 when pip failed."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


@dataclass
class Dist:
    """One package of the closure: its version, what it requires, and its wheel once there is one."""

    name: str
    version: str
    requires: list[str]
    wheel: Path | None = None

    @functools.cached_property
    def requirements(self) -> list[Requirement]:
        return [Requirement(r) for r in self.requires]


def read_pins(path: Path) -> dict[str, str]:
    """name -> version of each `name==version` line of a requirements or `pip freeze` file."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line and not line.startswith("-"):
            name, version = line.split("==", 1)
            pins[canonicalize_name(name.split("[")[0].strip())] = version.split(";")[0].strip()
    return pins


def target_environment(python: str) -> dict[str, str]:
    """The marker values of CPython `python` (e.g. "3.12") on Linux x86-64."""
    return dict(default_environment(), python_version=python, python_full_version=f"{python}.0",
                implementation_version=f"{python}.0", implementation_name="cpython",
                platform_python_implementation="CPython", sys_platform="linux", platform_system="Linux",
                platform_machine="x86_64", os_name="posix")  # fmt: skip


def active_requirements(dist: Dist, extra: str, env: dict[str, str]) -> list[Requirement]:
    """The requirements of `dist` that apply on the target, when installed with `extra` ("" for none)."""
    return [r for r in dist.requirements if r.marker is None or r.marker.evaluate(dict(env, extra=extra))]


def walk(dists: dict[str, Dist], roots: list[str], from_node: set[str], env: dict[str, str]):
    """What the roots need, transitively, when `from_node` come from the node (not followed):
    (the packages reached, every requirement on each package from those reached)."""
    seen, demands, todo = set(), defaultdict(list), [(name, "") for name in roots]
    while todo:
        name, extra = todo.pop()
        if (name, extra) in seen or name in from_node or name in NOT_NEEDED or NODE_PROVIDES.match(name):
            continue
        if name not in dists:
            fail(f"the resolution has no {name}, which the recipe needs (pip resolved another set?)", code=1)
        seen.add((name, extra))
        if name == NO_DEPS:
            continue
        for req in active_requirements(dists[name], extra, env):
            dep = canonicalize_name(req.name)
            demands[dep].append(req)
            todo += [(dep, ""), *((dep, e) for e in req.extras)]
    return {name for name, _ in seen}, demands


def leave_to_node(dists, pins, node, env, loose=frozenset()) -> tuple[set[str], set[str]]:
    """(what the wheelhouse needs, what the node provides instead). A pinned package is left to the
    node when the node has exactly the pinned version; another one (or a pin named in `loose`) when the
    node's version satisfies every requirement on it from the packages the wheelhouse keeps."""
    exact = {n: v for n, v in pins.items() if n not in loose}
    from_node = {n for n in dists if n in node and (n not in exact or Version(node[n]) == Version(exact[n]))}
    while True:
        needed, demands = walk(dists, list(pins), from_node, env)
        unfit = {
            n
            for n in from_node - set(exact)
            if not all(r.specifier.contains(Version(node[n]), prereleases=True) for r in demands[n])
        }
        if not unfit:
            return needed, {n for n in from_node if n in demands or n in pins}
        from_node -= unfit  # keeping these may demand more of the rest: walk again


def wheel_dist(path: Path) -> Dist:
    """A wheel file's name, version and requirements, read from its METADATA."""
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        meta = email.parser.Parser().parsestr(z.read(name).decode())
    return Dist(canonicalize_name(meta["Name"]), meta["Version"], meta.get_all("Requires-Dist") or [], path)


def stand_in(folder: Path, name: str, version: str) -> str:
    """A wheel named `name` with no files and no requirements: pip resolves against it instead of
    downloading the real one (torch and its CUDA libraries: the node's; NOT_NEEDED: unused). Returns
    the requirement that selects it."""
    folder.mkdir(parents=True, exist_ok=True)
    info = f"{name}-{version}.dist-info"
    files = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: llama_recipe\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as z:
        for file, text in files.items():
            z.writestr(file, text)
        z.writestr(f"{info}/RECORD", "".join(f"{file},,\n" for file in [*files, f"{info}/RECORD"]))
    return f"{name}=={version}"


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _wheel_tag(wheel_file: str) -> str:
    """The file-name tag of an installed distribution, from the Tag lines of its WHEEL file."""
    tags = [line.split(":", 1)[1].strip() for line in wheel_file.splitlines() if line.startswith("Tag:")]
    parts = [sorted({tag.split("-")[i] for tag in tags}) for i in range(3)]
    if len(parts[0]) * len(parts[1]) * len(parts[2]) != len(tags):  # not a product of sets: the first tag
        return tags[0]
    return "-".join(".".join(p) for p in parts)


def _archive_names(dist: importlib.metadata.Distribution, info: Path) -> dict[str, Path]:
    """name in the wheel -> installed file: site-packages files, plus the programs it put in bin/ that
    are not entry points (pip writes those again), as the wheel's .data/scripts."""
    scripts = Path(sysconfig.get_path("scripts")).resolve()
    entry_points = {e.name for e in dist.entry_points if e.group in ("console_scripts", "gui_scripts")}
    skip = {info / name for name in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")}
    names = {}
    for file in dist.files:
        source = Path(dist.locate_file(file))
        if "__pycache__" in file.parts or file in skip or not source.is_file():
            continue
        if file.parts[0] != "..":
            names[file.as_posix()] = source
        elif source.resolve().parent == scripts and file.name not in entry_points:
            names[f"{info.name.removesuffix('.dist-info')}.data/scripts/{file.name}"] = source
    return names


def repack_installed(dist: importlib.metadata.Distribution, folder: Path) -> Path:
    """An installed distribution as a wheel again (stored, not compressed: it is only copied and
    unpacked); bytecode and pip's install records are left out."""
    info = next(f for f in dist.files if f.name == "METADATA" and f.parent.name.endswith(".dist-info")).parent
    name, version = re.sub(r"[^\w.]+", "_", dist.metadata["Name"]), dist.version.replace("-", "_")
    path = folder / f"{name}-{version}-{_wheel_tag(dist.read_text('WHEEL'))}.whl"
    records = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for arcname, source in _archive_names(dist, info).items():
            data = source.read_bytes()
            entry = zipfile.ZipInfo(arcname, date_time=(1980, 1, 1, 0, 0, 0))
            entry.external_attr = (source.stat().st_mode & 0xFFFF) << 16  # keeps programs executable
            z.writestr(entry, data)
            records.append(f"{arcname},{_record_hash(data)},{len(data)}\n")
        z.writestr(f"{info.as_posix()}/RECORD", "".join(records) + f"{info.as_posix()}/RECORD,,\n")
    return path


def installed_source(folder: Path, pins: dict[str, str]) -> list[str]:
    """Repack what this interpreter has installed of the pins' closure; pip options that read only it."""
    folder.mkdir(parents=True)
    installed = {canonicalize_name(d.metadata["Name"]): d for d in importlib.metadata.distributions()}
    dists = {n: Dist(n, d.version, d.requires or []) for n, d in installed.items()}
    needed, _ = walk(dists, list(pins), set(), default_environment())
    for name in sorted(needed):
        repack_installed(installed[name], folder)
    return ["--isolated", "--no-index", "--find-links", str(folder)]  # --isolated: no pip config, no PIP_*


def platform_options(python: str, glibc: str) -> list[str]:
    """pip options that select wheels for CPython `python` on manylinux x86-64 up to `glibc`."""
    major, minor = (int(x) for x in glibc.split("."))
    tags = [f"manylinux_{major}_{m}_x86_64" for m in range(minor, 4, -1)]
    tags += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    return ["--python-version", python, "--implementation", "cp", *(o for t in tags for o in ("--platform", t))]


def pip(*args: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "BUILD_EXT"}  # colossalai: the pure-Python wheel
    if subprocess.run([sys.executable, "-m", "pip", *args], env=env).returncode != 0:
        fail(f"pip {args[0]} failed (above); the wheelhouse was not written", code=1)


def resolve(work: Path, pins: dict[str, str], torch: str, source: list[str], target: list[str],
            installed: bool) -> dict[str, Dist]:  # fmt: skip
    """pip resolves and downloads the pins' closure once; colossalai's wheel is added beside it
    (built from its sdist, or, with `installed`, the one repacked from this environment)."""
    requirements = work / "requirements.txt"
    requirements.write_text("".join(f"{n}=={v}\n" for n, v in pins.items() if n != NO_DEPS))
    wheels = work / "wheels"
    stand_ins = [stand_in(work / "stand-in", "torch", f"{Version(torch).public}+{STAND_IN_LABEL}")]
    stand_ins += [stand_in(work / "stand-in", name, f"0+{STAND_IN_LABEL}") for name in sorted(NOT_NEEDED)]
    pip("download", *source, "--only-binary=:all:", *target, "--find-links", str(work / "stand-in"),
        "--dest", str(wheels), "-r", str(requirements), *stand_ins)  # fmt: skip
    if installed:
        shutil.copy(next((work / "installed").glob("colossalai-*.whl")), wheels)
    else:
        pip("wheel", *source, "--no-deps", "--wheel-dir", str(wheels), f"{NO_DEPS}=={pins[NO_DEPS]}")
    dists = {d.name: d for d in map(wheel_dist, sorted(wheels.glob("*.whl")))}
    for name in ["torch", *NOT_NEEDED]:
        dists.pop(name).wheel.unlink()
    if forbidden := sorted(n for n in dists if NODE_PROVIDES.match(n)):
        fail(f"the closure pulled {', '.join(forbidden)}: those come with the node's torch", code=1)
    return dists


def unmet_requirements(site: Path) -> list[str]:
    """What the packages installed in `site` require (with the extras they ask of each other) that
    this Python does not import at a fitting version, `site` first on its path and then the node's
    own packages: a node freeze that was stale, or another node's, shows here."""
    installed = {canonicalize_name(d.metadata["Name"]): d for d in importlib.metadata.distributions(path=[str(site)])}
    installed.pop(NO_DEPS, None)  # installed without its pins on purpose
    todo, seen, unmet = [(name, "") for name in installed], set(), []
    while todo:
        name, extra = todo.pop()
        if (name, extra) in seen:
            continue
        seen.add((name, extra))
        dist = installed.get(name) or importlib.metadata.distribution(name)
        for req in active_requirements(Dist(name, dist.version, dist.requires or []), extra, default_environment()):
            if canonicalize_name(req.name) in NOT_NEEDED:
                continue
            try:  # the version this Python imports
                found = importlib.metadata.version(req.name)
            except importlib.metadata.PackageNotFoundError:
                found = None
            if found is None or not req.specifier.contains(Version(found), prereleases=True):
                unmet.append(f"{name} {dist.version} needs {req}, found {found or 'nothing'}")
            elif req.extras:
                todo += [(canonicalize_name(req.name), e) for e in req.extras]
    return sorted(set(unmet))


def names(text: str) -> set[str]:
    return {canonicalize_name(n) for n in text.split(",") if n.strip()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_wheelhouse.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", default="wheelhouse", help="the wheelhouse directory (replaced)")
    parser.add_argument("--python", default=os.environ.get("WHEELHOUSE_PYTHON", "3.12"),
                        help="the node's Python version (default 3.12, or $WHEELHOUSE_PYTHON)")  # fmt: skip
    parser.add_argument("--glibc", default="2.28", help="the newest manylinux (glibc) the node runs (2.28)")
    parser.add_argument("--torch", help="the node's torch version (default: from --node-freeze, else the pin)")
    parser.add_argument("--node-freeze", type=Path, help="the node's `pip list --format=freeze`: leave out what it has")
    parser.add_argument("--loose", type=names, default=set(),
                        help="pins the node may provide at another version the wheelhouse accepts (numpy,...)")  # fmt: skip
    parser.add_argument("--omit", type=names, default=set(),
                        help="pins to leave out with what only they need (fabric: multi-node launch only)")  # fmt: skip
    parser.add_argument("--check-install", type=Path, metavar="DIR",
                        help="(gpu_check.sh) print what DIR's packages require and this Python lacks, then stop")  # fmt: skip
    parser.add_argument("--from-installed", action="store_true",
                        help="wheels from this interpreter's installed packages (for this Python), no index")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.check_install:
        print("".join(f"{line}\n" for line in unmet_requirements(args.check_install)), end="")
        return
    pins = read_pins(REPO / "requirements-gpu.txt") | read_pins(REPO / "requirements-colossalai.txt")
    if args.node_freeze and not args.node_freeze.is_file():
        fail(f"--node-freeze {args.node_freeze}: no such file (on the node: python3 -m pip list --format=freeze)")
    torch_pin, node = pins.pop("torch"), read_pins(args.node_freeze) if args.node_freeze else {}
    if unknown := (args.loose | args.omit) - set(pins):
        fail(f"--loose/--omit name {', '.join(sorted(unknown))}, not pins of requirements-gpu.txt")
    pins = {n: v for n, v in pins.items() if n not in args.omit}
    python = f"{sys.version_info.major}.{sys.version_info.minor}" if args.from_installed else args.python
    torch = (
        args.torch or node.get("torch") or (importlib.metadata.version("torch") if args.from_installed else torch_pin)
    )
    output = Path(args.output).resolve()
    if output.exists() and any(output.iterdir()) and not (output / "wheelhouse.txt").is_file():
        fail(f"{output} exists and is not a wheelhouse (it would be replaced): name a new directory")
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="wheelhouse-", dir=output.parent) as tmp:
        work = Path(tmp)
        source = installed_source(work / "installed", pins) if args.from_installed else []
        target = [] if args.from_installed else platform_options(python, args.glibc)
        dists = resolve(work, pins, torch, source, target, args.from_installed)
        env = default_environment() if args.from_installed else target_environment(python)
        needed, from_node = leave_to_node(dists, pins, node, env, args.loose)
        if unexplained := set(dists) - walk(dists, list(pins), set(), env)[0]:
            print(f"note: pip resolved {', '.join(sorted(unexplained))} for no requirement this walk saw; kept")
        ready = work / "ready"
        ready.mkdir()
        for name in sorted(needed | unexplained):
            shutil.move(dists[name].wheel, ready)
        write_manifest(ready, dists, needed | unexplained, from_node, node, python, torch)
        shutil.rmtree(output, ignore_errors=True)
        ready.rename(output)
    print_listing(output, dists, needed | unexplained, from_node, node)


def write_manifest(folder, dists, kept, from_node, node, python, torch) -> None:
    lines = [f"# scripts/gpu_wheelhouse.sh: CPython {python}, manylinux x86-64, beside the node's torch {torch}\n"]
    lines += [f"{dists[n].name}=={dists[n].version}\n" for n in sorted(kept)]
    lines += [f"# from the node: {n}=={node[n]}\n" for n in sorted(from_node)]
    (folder / "wheelhouse.txt").write_text("".join(lines))


def print_listing(folder: Path, dists, kept, from_node, node) -> None:
    sizes = {n: (folder / dists[n].wheel.name).stat().st_size for n in kept}
    for name in sorted(kept, key=lambda n: -sizes[n]):
        print(f"{sizes[name] / 1e6:9.2f} MB  {name}=={dists[name].version}")
    if from_node:
        print("from the node:", ", ".join(f"{n}=={node[n]}" for n in sorted(from_node)))
    print(f"{folder}: {len(kept)} wheels, {sum(sizes.values()) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
