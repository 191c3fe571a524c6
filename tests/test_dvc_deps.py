"""Every repository file a DVC stage runs is among that stage's deps, so that a change in it makes
the stage (and what consumes its outputs) out of date.

A stage's files are found from its command (``python -m pipeline.<stage>``) by following every
import statement (top level or inside functions) into the repository's packages; a stage that runs
lmms-eval (it imports ``zoo_prune.evaluation``) also runs the ``zoo_prune`` model that lmms-eval
loads through the entry point and the task code under ``lmms_tasks/``.
"""

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("zoo_prune", "pipeline", "analysis")


def module_file(name: str) -> Path | None:
    path = ROOT.joinpath(*name.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def lazy_module(package: str, name: str) -> str | None:
    """The module a package's lazy ``__getattr__`` imports for ``name`` (``zoo_prune._EXPORTS``)."""
    if package != "zoo_prune":
        return None
    import zoo_prune

    return zoo_prune._EXPORTS.get(name)


def imports_of(path: Path) -> set[Path]:
    """Repository files imported by ``path`` (packages' ``__init__`` files included)."""
    relative = path.relative_to(ROOT).with_suffix("")
    package = list(relative.parts[:-1]) if relative.name != "__init__" else list(relative.parts[:-1])
    found = set()
    tree = ast.parse(path.read_text())
    lazy = [n for n in ast.walk(tree) if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING"]
    skipped = {id(n) for block in lazy for n in ast.walk(block)}  # what a lazy __init__ imports on use, not on import
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[: len(package) - (node.level - 1)]
                base = ".".join(parent + ([node.module] if node.module else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            names += [f"{base}.{lazy_module(base, alias.name)}" for alias in node.names if lazy_module(base, alias.name)]
        for name in names:
            parts = name.split(".")
            if parts[0] not in PACKAGES:
                continue
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
                file = module_file(".".join(parts[:i]))
                if file is not None:
                    found.add(file)
    return found


def closure(roots: set[Path]) -> set[Path]:
    seen, todo = set(), list(roots)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo += imports_of(path) - seen
    return seen


def stage_files(cmd: str, testbed: bool = True) -> set[Path]:
    module = re.search(r"python -m (pipeline\.\w+)", cmd).group(1)
    files = closure({module_file(module)})
    if module_file("zoo_prune.evaluation") in files:  # lmms-eval runs: the entry point's model, the tasks' code
        files |= closure({module_file("zoo_prune.integrations.lmms_eval")})
        if testbed:  # the paper profile runs lmms-eval's own tasks (or paper.include_path's)
            files |= {p for p in (ROOT / "lmms_tasks").rglob("*") if p.is_file()}
    return files


def covered(path: Path, deps: list[str]) -> bool:
    relative = path.relative_to(ROOT)
    return any(relative == Path(dep) or Path(dep) in relative.parents for dep in deps)


STAGES = {f"{file}:{name}": stage.get("do", stage)  # a foreach stage's entries share its `do`
          for file in ("dvc.yaml", "paper/dvc.yaml")
          for name, stage in yaml.safe_load((ROOT / file).read_text())["stages"].items()}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_cover_every_file_it_runs(name):
    stage = STAGES[name]
    deps = [dep if isinstance(dep, str) else next(iter(dep)) for dep in stage.get("deps", [])]
    files = stage_files(stage["cmd"], testbed=not name.startswith("paper/"))
    missing = sorted(str(p.relative_to(ROOT)) for p in files if not covered(p, deps))
    assert not missing, f"{name.split(':')[0]} stage {name!r} runs {missing} but does not list them (or a folder holding them) in deps"


def test_the_check_sees_lazy_and_relative_imports():
    files = closure({module_file("pipeline.evaluate")})
    assert module_file("zoo_prune.evaluation") in files  # imported inside a function
    assert ROOT / "zoo_prune" / "adapters" / "llava_next.py" in files  # through the lazy zoo_prune/__init__ and relative imports
    assert ROOT / "zoo_prune" / "pruned_model.py" not in closure({module_file("zoo_prune.testbed.dataset")})
    assert not covered(ROOT / "zoo_prune" / "methods" / "zoo.py", ["zoo_prune/method", "pipeline"])
    assert covered(ROOT / "zoo_prune" / "methods" / "zoo.py", ["zoo_prune/methods"])
