"""The API reference is built from the docstrings: every public function, class and method of the
core modules below says what its parameters mean (`Args:`) and what it returns (`Returns:`), read
with `ast` (nothing is imported). A class documents its constructor's parameters in its own
docstring (`Args:`, or `Attributes:` for a dataclass); properties and dataclass-generated methods
need no sections."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# One line per module; add the next one here.
COVERED_MODULES = (
    "selfflow.tokens",
    "selfflow.tokenizers.base",
    "selfflow.tokenizers.image",
    "selfflow.tokenizers.video",
    "selfflow.tokenizers.audio",
    "selfflow.flow.path",
    "selfflow.flow.timesteps",
    "selfflow.flow.dual_timestep",
    "selfflow.flow.solvers",
    "selfflow.models.transformer",
    "selfflow.models.layers",
    "selfflow.models.attention",
    "selfflow.models.embeddings",
    "selfflow.objectives.representation",
    "selfflow.objectives.ema",
    "selfflow.objectives.flow_loss",
    "selfflow.objectives.gamma_schedule",
    "selfflow.sampling.generate",
    "selfflow.sampling.job",
    "selfflow.evaluation.linear_probe",
    "selfflow.evaluation.probe",
    "selfflow.evaluation.features",
    "selfflow.evaluation.frechet",
    "selfflow.interop.checkpoint",
    "selfflow.interop.stored_model",
)
SELF_NAMES = {"self", "cls"}
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)
NO_SECTIONS_DECORATORS = {"property", "cached_property", "setter", "deleter", "overload"}


def decorator_names(node: ast.FunctionDef | ast.ClassDef) -> set[str]:
    """The last dotted part of each decorator (`dataclasses.dataclass(frozen=True)`: dataclass)."""
    names = set()
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if isinstance(target, ast.Attribute):
            names.add(target.attr)
        elif isinstance(target, ast.Name):
            names.add(target.id)
    return names


def parameter_names(function: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    """The parameters a caller passes: positional, keyword-only, *args, **kwargs; not self/cls."""
    arguments = function.args
    named = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]
    named += [star for star in (arguments.vararg, arguments.kwarg) if star is not None]
    return [argument.arg for argument in named if argument.arg not in SELF_NAMES]


def returns_a_value(function: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Whether the return annotation exists and is not `None`."""
    annotation = function.returns
    returns_none = isinstance(annotation, ast.Constant) and annotation.value is None
    return annotation is not None and not returns_none


def has_section(docstring: str | None, *sections: str) -> bool:
    """Whether the docstring has a line that is one of the Google-style section headers given."""
    lines = {line.strip() for line in (docstring or "").splitlines()}
    return any(f"{section}:" in lines for section in sections)


def function_gaps(function: ast.FunctionDef | ast.AsyncFunctionDef, name: str) -> list[str]:
    """The sections a public function or method lacks, as `name: Args` entries."""
    if decorator_names(function) & NO_SECTIONS_DECORATORS:
        return []
    docstring = ast.get_docstring(function)
    gaps = []
    if parameter_names(function) and not has_section(docstring, "Args"):
        gaps.append(f"{name}: Args")
    if returns_a_value(function) and not has_section(docstring, "Returns", "Yields"):
        gaps.append(f"{name}: Returns")
    return gaps


def class_gaps(cls: ast.ClassDef, name: str) -> list[str]:
    """The sections a public class lacks: its constructor's, then those of its public methods."""
    docstring = ast.get_docstring(cls)
    methods = [node for node in cls.body if isinstance(node, FUNCTIONS)]
    gaps = []
    if "dataclass" in decorator_names(cls):
        fields = [node for node in cls.body if isinstance(node, ast.AnnAssign)]
        if fields and not has_section(docstring, "Attributes", "Args"):
            gaps.append(f"{name}: Attributes")
    init = next((method for method in methods if method.name == "__init__"), None)
    init_docstring = ast.get_docstring(init) if init is not None else None
    documented = has_section(docstring, "Args") or has_section(init_docstring, "Args")
    if init is not None and parameter_names(init) and not documented:
        gaps.append(f"{name}: Args")
    for method in methods:
        if not method.name.startswith("_"):
            gaps += function_gaps(method, f"{name}.{method.name}")
    return gaps


def module_gaps(module: str) -> list[str]:
    """Every missing section of the public top-level functions and classes of one module."""
    path = ROOT / (module.replace(".", "/") + ".py")
    tree = ast.parse(path.read_text(), filename=str(path))
    gaps = []
    for node in tree.body:
        if not isinstance(node, (*FUNCTIONS, ast.ClassDef)) or node.name.startswith("_"):
            continue
        if isinstance(node, FUNCTIONS):
            gaps += function_gaps(node, f"{module}.{node.name}")
        elif isinstance(node, ast.ClassDef):
            gaps += class_gaps(node, f"{module}.{node.name}")
    return gaps


@pytest.mark.parametrize("module", COVERED_MODULES)
def test_public_functions_and_classes_document_their_args_and_returns(module):
    gaps = module_gaps(module)
    assert not gaps, "missing docstring sections (Google style):\n" + "\n".join(gaps)


def test_a_missing_section_is_found():
    source = '''
def scale(x: int, factor: int) -> int:
    """Scale x.

    Returns:
        x times factor.
    """
'''
    tree = ast.parse(source)
    assert function_gaps(tree.body[0], "scale") == ["scale: Args"]
