"""The layout's rules hold: dependencies point one way, the core imports no Lightning or Hydra,
nothing edits sys.path, test modules share code through tests/helpers only
(docs/architecture.md)."""

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# lower layers first; a module may import its own layer and the ones below it. A dotted key is a
# stage inside a package (the longest matching key decides): data's stages read files, then
# batch them.
LAYERS = {
    "io": 0,
    "tokens": 0,
    "safe_config": 0,
    "dependencies": 0,
    "data": 1,
    "data.batching": 1,
    "data.folders": 2,
    "data.shards": 3,
    "data.builtin": 3,
    "tokenizers": 4,
    "flow": 5,
    "models": 5,
    "objectives": 6,
    "interop": 7,
    "sampling": 7,
    "evaluation": 8,
    "training": 9,
    "cli": 10,
}
CORE = (
    "io",
    "tokens",
    "safe_config",
    "data",
    "tokenizers",
    "models",
    "flow",
    "objectives",
    "sampling",
    "interop",
    "evaluation",
)


def layer_of(module: str) -> str | None:
    """The LAYERS key of a dotted selfflow module name (`selfflow.data.shards.index`
    -> `data.shards`)."""
    parts = module.split(".")[1:]
    keys = [".".join(parts[:n]) for n in range(len(parts), 0, -1)]
    return next((key for key in keys if key in LAYERS), None)


def imported_selfflow_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every selfflow import in the file, at any depth (lazy imports inside
    functions too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("selfflow."):
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("selfflow.")]
    return found


def test_no_layer_imports_a_higher_one():
    violations = []
    for path in sorted((ROOT / "selfflow").rglob("*.py")):
        source = layer_of(".".join(path.relative_to(ROOT).with_suffix("").parts))
        for line, module in imported_selfflow_modules(path) if source else []:
            target = layer_of(module)
            if target is not None and LAYERS[target] > LAYERS[source]:
                violations.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not violations, "\n".join(violations)


def test_every_package_is_placed_in_a_layer():
    """A new package or stage gets its place in LAYERS (and its rule in docs/architecture.md)."""
    packages = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "selfflow").rglob("__init__.py")
    }
    unplaced = sorted(p for p in packages - {"selfflow", "selfflow.conf"} if layer_of(p) is None)
    assert not unplaced, f"packages with no layer: {unplaced}"
    undocumented = sorted(
        p for p in packages if not (ROOT / p.replace(".", "/") / "__init__.py").read_text().strip()
    )
    assert not undocumented, f"packages whose __init__ does not say what they hold: {undocumented}"


def test_the_core_imports_neither_lightning_nor_hydra():
    """Every module below training/ imports (checkpoint loading for sampling and probing included)
    without pulling in Lightning or Hydra: the core is plain PyTorch, usable from a notebook."""
    code = (
        "import importlib, pkgutil, sys\n"
        f"for name in {['selfflow.' + c for c in CORE]!r}:\n"
        "    module = importlib.import_module(name)\n"
        "    for info in pkgutil.iter_modules(getattr(module, '__path__', []), name + '.'):\n"
        "        importlib.import_module(info.name)\n"
        "print(sorted(m for m in ('lightning', 'pytorch_lightning', "
        "'hydra') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_nothing_edits_sys_path():
    edits = [
        str(p.relative_to(ROOT))
        for folder in ("selfflow", "tools", "tests")
        for p in (ROOT / folder).rglob("*.py")
        if "sys.path." in p.read_text() and p.name != Path(__file__).name
    ]
    assert not edits, f"sys.path edits in {edits}"


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, at any depth; `from a import b` counts as a and
    a.b (b may be a module); relative imports are resolved against the file's package."""
    package = path.relative_to(ROOT).parent.parts
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            stem = list(package[: len(package) + 1 - node.level]) if node.level else []
            base = ".".join(stem + ([node.module] if node.module else []))
            found += [(node.lineno, base), *((node.lineno, f"{base}.{a.name}") for a in node.names)]
    return found


def test_test_modules_share_code_through_tests_helpers_only():
    """No file under tests/ imports a test module or conftest: pytest imports those itself, and what
    several test modules share lives in tests/helpers."""
    violations = {
        f"{path.relative_to(ROOT)}:{line}": module
        for path in sorted((ROOT / "tests").rglob("*.py"))
        for line, module in imported_modules(path)
        if re.match(r"tests\.(conftest|test_\w+)(\.|$)", module)
    }
    assert not violations, "\n".join(
        f"{where} imports {module}" for where, module in violations.items()
    )


def module_graph() -> dict[str, set[str]]:
    """{module: the selfflow modules it imports}, imports inside functions included; `from a import
    b` is an edge to a.b where b is a module, else to a."""
    modules = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
        for p in (ROOT / "selfflow").rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = {m if m in modules else m.rpartition(".")[0] for _, m in imported_modules(path)}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
            if len(group) > 1:
                circles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def test_no_module_imports_itself_through_others():
    """No import circles anywhere in selfflow/, not even through an import inside a function."""
    circles = import_circles(module_graph())
    assert not circles, "\n".join(" <-> ".join(group) for group in circles)


def test_the_circle_finder_finds_a_circle():
    assert import_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_circles({"a": {"b"}, "b": set()}) == []


def test_no_command_imports_another_command():
    """A console script's module is an entry point: what two commands share lives below cli/."""
    import configparser

    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    entry_points = setup["options.entry_points"]["console_scripts"].split("\n")
    commands = {line.split("=")[1].strip().split(":")[0] for line in entry_points if "=" in line}
    graph = module_graph()
    crossings = sorted(f"{c} imports {t}" for c in commands for t in graph[c] if t in commands)
    assert not crossings, "\n".join(crossings)


def many_field_dataclasses() -> dict[str, str]:
    """{class name: file} of selfflow's dataclasses with more than four fields."""
    found = {}
    for path in (ROOT / "selfflow").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            decorators = [ast.unparse(d) for d in getattr(node, "decorator_list", [])]
            dataclass = any(d.startswith("dataclass") for d in decorators)
            if dataclass and sum(isinstance(s, ast.AnnAssign) for s in node.body) > 4:
                found[node.name] = str(path.relative_to(ROOT))
    return found


def test_dataclasses_with_many_fields_are_built_by_keyword():
    """A reordered field of a dataclass built from many positional values would swap
    them silently."""
    classes = many_field_dataclasses()
    assert "ShardTable" in classes  # the finder sees dataclasses
    positional = [
        f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node.func)}(...)"
        for path in (ROOT / "selfflow").rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        and node.args
        and ast.unparse(node.func).split(".")[-1] in classes
    ]
    assert not positional, "\n".join(sorted(positional))


def test_functions_fit_on_a_screen():
    """No function in selfflow/ is longer than 60 lines, its docstring included."""
    long = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} "
        f"({node.end_lineno - node.lineno + 1} lines)"
        for path in (ROOT / "selfflow").rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno >= 60
    ]
    assert not long, "\n".join(sorted(long))


def test_every_package_is_installed():
    """setup.cfg lists its packages one by one: a package missing there is missing from a wheel."""
    import configparser

    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    listed = set(setup["options"]["packages"].split())
    found = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "selfflow").rglob("__init__.py")
    }
    assert found - listed == set(), f"packages missing from setup.cfg: {sorted(found - listed)}"
