"""The package's shape, read from the source with `ast`: entry points import no entry point, and every
DVC stage lists, in dvc.yaml, the pipeline code it runs (so editing that code reruns the stage)."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = ROOT / "pipeline"
# Shared plumbing every stage imports, left out of the stages' deps on purpose: `common` is logging,
# atomic writes and seeding, and `params` reads params.yaml, whose values dvc.yaml already tracks key by
# key; an edit to either would rerun the whole pipeline for outputs that do not change. Their own
# imports are not followed (params -> model_names serves deploy's name checks, not a stage).
EXEMPT = frozenset({"pipeline.common", "pipeline.params"})
STAGE_COMMAND = re.compile(r"python -m (pipeline\.\w+)")


def module_path(module: str) -> Path:
    return ROOT / (module.replace(".", "/") + ".py")


@cache
def imports_of(module: str) -> frozenset[str]:
    """The `pipeline.*` modules `module` imports anywhere in its source, function-local imports included."""
    tree = ast.parse(module_path(module).read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            if node.module == "pipeline":  # from pipeline import tiny
                found |= {f"pipeline.{alias.name}" for alias in node.names}
    return frozenset(name for name in found if name.startswith("pipeline.") and module_path(name).is_file())


def defines_main(module: str) -> bool:
    tree = ast.parse(module_path(module).read_text(encoding="utf-8"))
    return any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body)


def closure(module: str) -> set[str]:
    """`module` and everything it imports, directly or not, stopping at the exempt modules."""
    seen, frontier = {module}, [module]
    while frontier:
        for imported in imports_of(frontier.pop()) - EXEMPT:
            if imported not in seen:
                seen.add(imported)
                frontier.append(imported)
    return seen


MODULES = sorted(f"pipeline.{path.stem}" for path in PIPELINE.glob("*.py") if path.stem != "__init__")
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_the_import_reader_sees_module_level_function_local_and_from_package_imports():
    assert imports_of("pipeline.quantize") >= {"pipeline.common", "pipeline.params", "pipeline.llama_runtime"}
    assert "pipeline.go_template" in imports_of("pipeline.evaluators")  # imported inside GGUFModel.prompt
    assert "pipeline.tiny" in imports_of("pipeline.models")  # `from pipeline import tiny`, in a function
    assert defines_main("pipeline.gate") and not defines_main("pipeline.release")


def test_no_pipeline_module_imports_a_module_that_defines_main():
    entry_points = {module for module in MODULES if defines_main(module)}
    sideways = sorted(
        f"{module} -> {imported}" for module in MODULES for imported in imports_of(module) if imported in entry_points
    )
    assert sideways == []


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_each_stage_lists_exactly_the_pipeline_code_it_imports_as_deps(stage):
    module = STAGE_COMMAND.match(STAGES[stage]["cmd"])[1]
    code = {str(module_path(name).relative_to(ROOT)) for name in closure(module)}
    listed = {dep for dep in STAGES[stage]["deps"] if dep.startswith("pipeline/")}
    assert sorted(listed) == sorted(code)


def test_exempt_modules_are_real_and_no_stage_lists_them():
    assert all(module_path(module).is_file() for module in EXEMPT)
    for stage in STAGES.values():
        assert not {str(module_path(module).relative_to(ROOT)) for module in EXEMPT} & set(stage["deps"])
