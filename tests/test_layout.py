"""The package layout is the architecture: imports flow one way between ist_ds's sub-packages.

Every ``import``/``from ... import`` of ist_ds inside ist_ds (also those inside functions) is read with
``ast``; a module may import its own package and the packages below it in :data:`MAY_IMPORT`.
docs/architecture.md draws the same picture.
"""

from __future__ import annotations

import ast
import os

import pytest

import ist_ds

PACKAGE_DIR = os.path.dirname(ist_ds.__file__)

#: What each sub-package may import of ist_ds (besides itself). ``ist_ds`` is the package's
#: ``__init__`` (``ist_ds.initialize`` and the public names).
MAY_IMPORT = {
    "core": set(),
    "compat": {"core"},
    "model": {"core", "compat"},
    "optim": {"core", "compat", "model"},
    "runtime": {"core", "compat", "model", "optim"},
    "backends": {"core", "compat", "model", "optim", "runtime"},
    "observe": {"core", "compat", "model", "optim", "runtime"},
    "integrations": {"core", "compat", "model", "optim", "runtime", "backends"},
    "jobs": {"core", "compat", "model", "optim", "runtime", "backends", "observe", "integrations", "ist_ds"},
    "ist_ds": {"core", "backends"},
}


def _package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "ist_ds"


def imports_by_module() -> dict[str, list[tuple[int, str]]]:
    """{module: [(line, imported ist_ds module), ...]} for every module of ist_ds."""
    out = {}
    for root, _, files in os.walk(PACKAGE_DIR):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            rel = os.path.relpath(path, os.path.dirname(PACKAGE_DIR))[:-3].replace(os.sep, ".")
            module = rel.removesuffix(".__init__")
            with open(path) as f:
                tree = ast.parse(f.read(), path)
            found = []
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "ist_ds":
                    if node.module == "ist_ds":  # from ist_ds import core / initialize
                        found += [(node.lineno, f"ist_ds.{a.name}" if a.name in MAY_IMPORT else "ist_ds")
                                  for a in node.names]
                    else:
                        found.append((node.lineno, node.module))
                elif isinstance(node, ast.ImportFrom) and node.level > 0:
                    found.append((node.lineno, "relative import"))
                elif isinstance(node, ast.Import):
                    found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "ist_ds"]
            out[module] = found
    return out


def layering_violations(graph: dict[str, list[tuple[int, str]]]) -> list[str]:
    bad = []
    for module, imports in graph.items():
        pkg = _package_of(module)
        for line, target in imports:
            if target == "relative import":
                bad.append(f"{module}:{line}: relative import (write the absolute ist_ds path)")
                continue
            tpkg = _package_of(target)
            if tpkg != pkg and tpkg not in MAY_IMPORT[pkg]:
                bad.append(f"{module}:{line}: {pkg} imports {target} ({tpkg} is above it)")
    return bad


def test_every_sub_package_is_in_the_table():
    pkgs = {_package_of(m) for m in imports_by_module()}
    assert pkgs == set(MAY_IMPORT), f"new or removed sub-package: update MAY_IMPORT and docs/architecture.md: {pkgs ^ set(MAY_IMPORT)}"


def test_imports_flow_one_way():
    assert layering_violations(imports_by_module()) == []


@pytest.mark.parametrize("module, target", [
    ("ist_ds.core.importance", "ist_ds.model.layers"),      # the algorithm reaching into the model
    ("ist_ds.model.param_groups", "ist_ds.optim.gate"),     # the model reaching up into the optimizer
    ("ist_ds.runtime.controller", "ist_ds.jobs.runner"),    # the runtime reaching into the job runner
    ("ist_ds.compat.deepspeed", "ist_ds.backends.zero_memory"),
])
def test_an_upward_import_is_reported(module, target):
    graph = {module: [(7, target)]}
    (problem,) = layering_violations(graph)
    assert problem.startswith(f"{module}:7:") and target in problem
