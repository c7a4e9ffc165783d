"""The package's shape, checked from the source: imports go down the layers, never in a cycle.

Built with ``ast`` from every module of the project (imports inside functions included), so a new
upward import or cycle fails here, not in a user's ``freezetune`` call.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("strategies", "pipelines", "tune_spaces", "benchmarks")

# Bottom up. A module may import its own package (without cycles) and any package of a LOWER layer.
LAYERS = [
    ["strategies", "pipelines:"],  # what trains at which LR (pure torch/transformers/peft); the bare namespace
    ["pipelines.config"],  # run configs, their sections, paths (no torch)
    ["tune_spaces"],  # sweep definitions over run configs
    ["pipelines.data", "pipelines.models"],
    ["pipelines.training", "pipelines.tracking"],  # the worker side (no MLflow) | MLflow only (no Ray, no torch)
    ["pipelines.demo", "pipelines.reporting"],  # demo artefacts (built with the loop) | read runs, rank, render
    ["pipelines.jobs"],  # the Ray driver side: train, sweep, analyze, preflight
    ["pipelines.cli"],  # one module per command
    ["benchmarks"],  # imports the package; the package never imports it
]
FORBIDDEN = {  # package -> third-party top-level modules it must never import
    "strategies": {"ray", "mlflow"},
    "pipelines.config": {"torch", "ray", "mlflow", "transformers"},
    "pipelines.training": {"mlflow"},
    "pipelines.tracking": {"ray", "torch"},
    "pipelines.reporting": {"ray"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


MODULES = _modules()


def _package_of(module: str) -> str:
    """The layer entry a module belongs to (the longest matching prefix)."""
    matches = [pkg for layer in LAYERS for pkg in layer
               if module == pkg.rstrip(":") or (not pkg.endswith(":") and module.startswith(pkg + "."))]
    assert matches, f"{module} is in no layer: add its package to LAYERS"
    return max(matches, key=len)


def _layer_of(module: str) -> int:
    pkg = _package_of(module)
    return next(i for i, layer in enumerate(LAYERS) if pkg in layer)


class Imports(ast.NodeVisitor):
    """(target module, line, inside a function?, comment on that line) for every import of a module."""

    def __init__(self, name: str, source: str):
        self.name, self.lines, self.depth, self.found = name, source.splitlines(), 0, []

    def _add(self, target: str, node: ast.AST) -> None:
        line, above = self.lines[node.lineno - 1], self.lines[node.lineno - 2].strip()
        comment = line.split("#", 1)[1].strip() if "#" in line else above[1:].strip() if above.startswith("#") else ""
        self.found.append((target, node.lineno, self.depth > 0, comment))

    def visit_FunctionDef(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Import(self, node):
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node):
        base = node.module or ""
        if node.level:  # relative: resolve against this module's package
            package = self.name.split(".")[: -node.level] if not MODULES[self.name].name == "__init__.py" else \
                self.name.split(".")[: len(self.name.split(".")) - node.level + 1]
            base = ".".join(package + ([base] if base else []))
        for alias in node.names:
            full = f"{base}.{alias.name}"
            self._add(full if full in MODULES else base, node)


def _imports(name: str) -> list[tuple[str, int, bool, str]]:
    source = MODULES[name].read_text()
    visitor = Imports(name, source)
    visitor.visit(ast.parse(source))
    return visitor.found


def _project_target(target: str) -> str | None:
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


GRAPH = {name: sorted({t for t in (_project_target(i[0]) for i in _imports(name)) if t and t != name})
         for name in MODULES}


def test_every_module_is_in_a_layer():
    for name in MODULES:
        _layer_of(name)


def test_imports_go_down_the_layers():
    upward = []
    for name, targets in GRAPH.items():
        for target in targets:
            same_package = _package_of(target) == _package_of(name)
            if not same_package and _layer_of(target) >= _layer_of(name):
                upward.append(f"{name} -> {target} ({_package_of(name)} may only import lower layers)")
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in GRAPH[node]:
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_function_level_imports_of_project_modules_say_why():
    """Only where they keep `freezetune --help` fast (command modules and what they load), with a reason."""
    unexplained = []
    for name in MODULES:
        for target, line, nested, comment in _imports(name):
            if nested and _project_target(target) and not comment.startswith("lazy:"):
                unexplained.append(f"{MODULES[name].relative_to(ROOT)}:{line} imports {target} inside a function "
                                   "without a `# lazy: <why>` comment")
    assert not unexplained, "\n".join(unexplained)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_keep_out_of_what_they_must_not_use(package):
    bad = [f"{name}:{line} imports {target}" for name in MODULES if _package_of(name) == package
           for target, line, _, _ in _imports(name) if target.split(".")[0] in FORBIDDEN[package]]
    assert not bad, "\n".join(bad)


def test_config_and_help_load_no_torch():
    """Configs are checked, and `freezetune --help` answers, before any model code is imported."""
    code = ("import sys, pipelines.config.run, tune_spaces.spec, pipelines.cli.main as m; m.build_parser(); "
            "print(sorted(k for k in ('torch', 'ray', 'mlflow', 'transformers') if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
