"""The layout's rules hold: dependencies point one way, the core imports no Lightning or Hydra, nothing edits
sys.path, test modules share code through tests/helpers only (docs/architecture.md)."""

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# lower layers first; a module may import its own layer and the ones below it
LAYERS = {
    "io": 0,
    "tokens": 0,
    "safe_config": 0,
    "data": 1,
    "tokenizers": 2,
    "flow": 3,
    "models": 3,
    "objectives": 4,
    "interop": 5,
    "sampling": 5,
    "evaluation": 6,
    "training": 7,
    "cli": 8,
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


def imported_selfflow_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every selfflow import in the file, at any depth (lazy imports inside functions too)."""
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
        parts = path.relative_to(ROOT).with_suffix("").parts
        source = parts[1] if len(parts) > 1 and parts[1] in LAYERS else None
        for line, module in imported_selfflow_modules(path) if source else []:
            target = module.split(".")[1]
            if target in LAYERS and LAYERS[target] > LAYERS[source]:
                violations.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not violations, "\n".join(violations)


def test_the_core_imports_neither_lightning_nor_hydra():
    """Every module below training/ imports (checkpoint loading for sampling and probing included) without pulling
    in Lightning or Hydra: the core is plain PyTorch, usable from a notebook."""
    code = (
        "import importlib, pkgutil, sys\n"
        f"for name in {['selfflow.' + c for c in CORE]!r}:\n"
        "    module = importlib.import_module(name)\n"
        "    for info in pkgutil.iter_modules(getattr(module, '__path__', []), name + '.'):\n"
        "        importlib.import_module(info.name)\n"
        "print(sorted(m for m in ('lightning', 'pytorch_lightning', 'hydra') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
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
    """(line, module) of every import in the file, at any depth; `from a import b` counts as a and a.b (b may be a
    module); relative imports are resolved against the file's package."""
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
    """No file under tests/ imports a test module or conftest: pytest imports those itself, and what several test
    modules share lives in tests/helpers."""
    violations = {
        f"{path.relative_to(ROOT)}:{line}": module
        for path in sorted((ROOT / "tests").rglob("*.py"))
        for line, module in imported_modules(path)
        if re.match(r"tests\.(conftest|test_\w+)(\.|$)", module)
    }
    assert not violations, "\n".join(f"{where} imports {module}" for where, module in violations.items())
