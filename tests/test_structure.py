"""The code's shape, checked: no import circle in llama_recipe/, in-package imports only at the top
of a module, plugin names compared only in the plugin registry, a training loop that fits on a
screen, the code as `ruff format` shapes it with `# fmt: skip` only on data tables, and no function of
too many statements (ruff's PLR0915, configured in pyproject.toml)."""

from __future__ import annotations

import ast
import subprocess

from conftest import PYTHON_BIN, REPO

PACKAGE = REPO / "llama_recipe"
FIT_MAX_LINES = 60


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text()) for p in sorted(PACKAGE.glob("*.py"))}


def _in_package(node: ast.ImportFrom | ast.Import) -> list[str]:
    """The llama_recipe modules an import statement names."""
    if isinstance(node, ast.ImportFrom):
        if node.level == 1 and node.module:
            return [node.module.split(".")[0]]
        if node.level == 1:  # from . import x
            return [alias.name for alias in node.names]
        if node.module and node.module.startswith("llama_recipe."):
            return [node.module.split(".")[1]]
        return []
    return [a.name.split(".")[1] for a in node.names if a.name.startswith("llama_recipe.")]


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of ours it imports (anywhere in the file)."""
    graph = {}
    for name, tree in _modules().items():
        graph[name] = {
            dep
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom)
            for dep in _in_package(node)
            if dep != name
        }
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path (first module repeated at the end), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert len(graph) > 15 and graph["trainer"]  # the graph really was read
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"


def test_in_package_imports_are_at_the_top_of_each_module():
    late = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                late += [
                    f"{name}.{node.name} imports {dep}"
                    for inner in ast.walk(node)
                    if isinstance(inner, ast.Import | ast.ImportFrom)
                    for dep in _in_package(inner)
                ]
    assert not late, late


def test_plugin_names_are_compared_only_in_the_registry():
    from llama_recipe.plugins import PLUGIN_NAMES

    found = []
    for name, tree in _modules().items():
        if name == "plugins":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                names = {c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)}
                # "none" is also Collage's mode; it counts as the baseline plugin only next to "plugin"
                if "plugin" in ast.unparse(node) and "none" in names:
                    names.add("plugin none")
                found += [
                    f"{name}.py:{node.lineno}: {ast.unparse(node)}" for n in names & {*PLUGIN_NAMES, "plugin none"}
                ]
    assert not found, found


def _function_lengths() -> dict[str, int]:
    lengths = {}
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lengths[f"{name}.{node.name}"] = node.end_lineno - node.lineno + 1
    return lengths


def test_the_training_loop_fits_on_a_screen():
    assert _function_lengths()["trainer.fit"] <= FIT_MAX_LINES


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(PYTHON_BIN / "ruff"), *args], cwd=REPO, capture_output=True, text=True)


def test_the_formatter_shapes_the_code_and_no_function_does_too_much():
    """`ruff format` decides every line's shape, and pyproject.toml's lint rules hold, PLR0915 among
    them: no function of more statements than `max-statements` (a count the formatter cannot game,
    unlike a line count)."""
    formatted, linted = _ruff("format", "--check", "."), _ruff("check", ".")
    assert formatted.returncode == 0, formatted.stdout + formatted.stderr
    assert linted.returncode == 0, linted.stdout + linted.stderr


def _skips_outside_data_tables(source: str) -> list[int]:
    """Lines marked `# fmt: skip` that do not end a module-level table: an assignment of a dict,
    list, tuple or set literal (whose columns the formatter would undo)."""
    tables = [
        range(node.lineno, node.end_lineno + 1)
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign | ast.AnnAssign)
        and isinstance(node.value, ast.Dict | ast.List | ast.Tuple | ast.Set)
    ]
    marked = [n for n, line in enumerate(source.splitlines(), 1) if line.rstrip().endswith("# fmt: skip")]
    return [n for n in marked if not any(n in table for table in tables)]


def test_fmt_skip_only_on_data_tables():
    assert _skips_outside_data_tables("T = {\n  1: 2,  3: 4,\n}  # fmt: skip\n") == []
    assert _skips_outside_data_tables("def f(a, b):\n    return g(a,\n             b)  # fmt: skip\n") == [3]
    found = {
        f"{path.relative_to(REPO)}:{line}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for line in _skips_outside_data_tables(path.read_text())
    }
    assert not found, found
