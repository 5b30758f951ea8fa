"""The shape of the code: Hydra only at the edge, thin stage apps, short functions on the training path."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "chatlm"

# packages (and modules) that make up the library: none of them may import Hydra or a stage app
LIBRARY = [
    "config",
    "model",
    "optim",
    "data",
    "tokenizer",
    "training",
    "runtime",
    "runs",
    "evals",
    "engine",
    "bench",
    "server",
    "errors.py",
]
EDGE_FILES = {SRC / "bench" / "__main__.py"}  # `python -m chatlm.bench`: the bench's Hydra edge
STAGE_APPS = ["train.py", "eval.py", "check.py", "tokenize.py", "serve.py", "bench/__main__.py"]
FORBIDDEN = (
    "hydra",
    "omegaconf",
    "hydra_plugins",
    "submitit",
    "chatlm.hydra",
    "chatlm.train",
    "chatlm.eval",
    "chatlm.check",
    "chatlm.tokenize",
    "chatlm.serve",
    "chatlm.cli",
)


def library_files() -> list[Path]:
    files = []
    for name in LIBRARY:
        path = SRC / name
        files += [path] if path.is_file() else sorted(path.rglob("*.py"))
    return [f for f in files if f not in EDGE_FILES]


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every module a file imports, at module level or inside functions (lazy imports count too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def is_forbidden(module: str) -> bool:
    return any(module == f or module.startswith(f + ".") for f in FORBIDDEN)


def test_the_walk_finds_the_library_and_the_edge():
    files = library_files()
    assert len(files) > 60 and SRC / "training" / "trainer.py" in files
    assert SRC / "hydra" / "app.py" not in files
    # the check can fail: the edge itself imports what the library may not
    assert any(is_forbidden(m) for _, m in imported_modules(SRC / "hydra" / "app.py"))


@pytest.mark.parametrize("path", library_files(), ids=lambda p: str(p.relative_to(SRC)))
def test_library_never_imports_hydra_or_a_stage_app(path):
    bad = [f"line {n}: {m}" for n, m in imported_modules(path) if is_forbidden(m)]
    assert not bad, f"{path.relative_to(SRC)} imports the edge: {bad}"


@pytest.mark.parametrize("app", STAGE_APPS)
def test_stage_apps_are_thin(app):
    lines = (SRC / app).read_text().splitlines()
    assert len(lines) < 100, f"{app} has {len(lines)} lines; move the work into the library"


def test_functions_on_the_training_path_are_short():
    long = []
    for path in sorted((SRC / "training").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 60:
                    long.append(f"{path.name}:{node.name} ({n} lines)")
    assert not long, long
