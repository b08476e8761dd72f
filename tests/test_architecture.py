"""The package's shape: no import cycles, no upward imports, and a command line that imports only
what the command it runs needs.

The import graph is read from the source with `ast` (imports inside functions count too: a lazy
import is still a dependency), so the test needs nothing importable and runs in a second.

Parts and who may import whom (DESIGN.md, "Layout"):
    platform    -> platform
    jobs        -> jobs, platform
    serve_apps  -> serve_apps, platform
    tune        -> tune, jobs, platform
    top level (cli, demo, …) -> anything but cli; nothing imports cli
    the root package (`raybooth`: its version) may be imported by all, and imports nothing itself
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "raybooth"

ALLOWED: dict[str, set[str]] = {
    "platform": {"platform"},
    "jobs": {"jobs", "platform"},
    "serve_apps": {"serve_apps", "platform"},
    "tune": {"tune", "jobs", "platform"},
}


def module_files(root: Path = SRC / PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (resolved to the most specific known module)."""

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import mod` names a module; `from mod import func` names the module.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                if target == PACKAGE or target.startswith(PACKAGE + "."):
                    resolved = resolve(target)
                    if resolved and resolved != mod:
                        edges.add(resolved)
        graph[mod] = edges
    return graph


def part_of(module: str) -> str:
    """`platform`, `jobs`, `serve_apps`, `tune`, or `top` (cli, demo and the root package)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else "top"


def upward_edges(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    bad = []
    for src, targets in graph.items():
        for dst in targets:
            if dst == PACKAGE:
                continue  # the version; the root package imports nothing (checked below)
            if dst == f"{PACKAGE}.cli":
                bad.append((src, dst))
                continue
            src_part, dst_part = part_of(src), part_of(dst)
            if src_part == "top":
                continue
            if dst_part == "top" or dst_part not in ALLOWED[src_part]:
                bad.append((src, dst))
    return sorted(bad)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def describe(graph: dict[str, set[str]]) -> str:
    edges = sum(len(t) for t in graph.values())
    return f"{len(graph)} modules, {edges} edges, {len(cycles(graph))} cycles"


def test_no_import_cycle_and_no_upward_import():
    graph = import_graph(module_files())
    print("import graph:", describe(graph))
    assert len(graph) > 40, "the package's modules were not found"
    assert cycles(graph) == []
    assert upward_edges(graph) == []
    assert graph[PACKAGE] == set()


def test_the_checks_catch_a_cycle_and_an_upward_edge():
    """The checks are not vacuous: an edge from the core up to training, and a cycle, both fail."""
    graph = {k: set(v) for k, v in import_graph(module_files()).items()}
    graph["raybooth.platform.config"].add("raybooth.jobs.train.driver")
    assert ("raybooth.platform.config", "raybooth.jobs.train.driver") in upward_edges(graph)
    assert cycles(graph), "platform.config -> jobs.train.driver -> … -> platform.config is a cycle"

    graph = {k: set(v) for k, v in import_graph(module_files()).items()}
    graph["raybooth.serve_apps.deployments"].add("raybooth.jobs.train.driver")
    graph["raybooth.jobs.train.driver"].add("raybooth.cli")
    assert {
        ("raybooth.jobs.train.driver", "raybooth.cli"),
        ("raybooth.serve_apps.deployments", "raybooth.jobs.train.driver"),
    } <= set(upward_edges(graph))


def test_relative_and_lazy_imports_are_read(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "platform").mkdir(parents=True)
    (pkg / "jobs").mkdir()
    for init in (pkg, pkg / "platform", pkg / "jobs"):
        (init / "__init__.py").write_text("")
    (pkg / "jobs" / "work.py").write_text("from ..platform import core\n")
    (pkg / "platform" / "core.py").write_text("def f():\n    from raybooth.jobs.work import x\n")
    graph = import_graph(module_files(pkg))
    assert graph["raybooth.jobs.work"] == {"raybooth.platform.core"}
    assert upward_edges(graph) == [("raybooth.platform.core", "raybooth.jobs.work")]
    assert cycles(graph) == [["raybooth.jobs.work", "raybooth.platform.core"]]


HEAVY = ("torch", "ray", "diffusers", "transformers", "mlflow")


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"], ["inpaint", "--help"]])
def test_help_imports_no_ml_stack_and_answers_fast(argv):
    code = (
        "import sys, contextlib, io\n"
        "from raybooth.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        f"        main({argv!r})\n"
        "    except SystemExit:\n"
        "        pass\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    elapsed = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"`raybooth {' '.join(argv)}` imported {out.stdout.strip()}"
    assert elapsed < 1.0, f"`raybooth {' '.join(argv)}` took {elapsed:.2f}s"


def test_every_command_is_listed_and_its_parser_loads():
    from raybooth.cli import PART_COMMANDS, build_parser

    full = build_parser()  # every command registered (imports them all)
    commands = full._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert {"generate", "inpaint", *PART_COMMANDS} <= set(commands)
    for name in PART_COMMANDS:
        lazy = build_parser([name, "--help"])
        assert name in lazy._subparsers._group_actions[0].choices  # type: ignore[union-attr]
