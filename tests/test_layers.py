"""The import-layer rule: pipeline stages import only downward; `methods/` imports only
torch, numpy, the standard library and itself."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mergecli"
# lowest first: a module may import its own stage and the stages before it
LAYERS = [
    ("errors", "units"),
    ("methods",),
    ("recipe",),
    ("io",),
    ("model",),
    ("vocab",),
    ("plan",),
    ("output",),
    ("engine",),
    ("lora",),
    ("api",),
    ("cli", "__main__"),
]
RANK = {stage: rank for rank, stages in enumerate(LAYERS) for stage in stages}
METHODS_MAY_IMPORT = {"torch", "numpy", "mergecli"} | set(sys.stdlib_module_names)


def stage_of(module: str) -> str:
    """`mergecli.plan.build` -> `plan`; the package root (`__version__`) -> `errors`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANK else "errors"


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = (
                [f"{node.module}.{a.name}" for a in node.names]
                if node.module == "mergecli"
                else [node.module]
            )
            found += [(node.lineno, name) for name in names]
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def module_name(path: Path) -> str:
    return ".".join(("mergecli", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(
        ".__init__"
    )


def test_every_stage_is_ranked() -> None:
    stages = {
        module_name(p).split(".")[1]
        for p in MODULES
        if p.name != "__init__.py" or p.parent != PACKAGE
    }
    assert stages == set(RANK), stages ^ set(RANK)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_stages_import_only_downward(path: Path) -> None:
    me = stage_of(module_name(path))
    upward = [
        f"line {line}: {name}"
        for line, name in imports(path)
        if name.startswith("mergecli.") and RANK[stage_of(name)] > RANK[me]
    ]
    assert not upward, f"{module_name(path)} ({me}) imports a later stage: {upward}"


@pytest.mark.parametrize("path", sorted((PACKAGE / "methods").rglob("*.py")), ids=lambda p: p.name)
def test_methods_import_only_torch_numpy_and_themselves(path: Path) -> None:
    bad = [
        f"line {line}: {name}"
        for line, name in imports(path)
        if name.split(".")[0] not in METHODS_MAY_IMPORT
        or (name.startswith("mergecli") and not name.startswith("mergecli.methods"))
    ]
    assert not bad, bad


def test_the_rule_catches_an_upward_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from mergecli.engine.run import run_plan\nimport scipy\n")
    assert [n for _, n in imports(bad)] == ["mergecli.engine.run", "scipy"]
    assert RANK[stage_of("mergecli.engine.run")] > RANK["plan"]
