"""The house plan holds: no import circles between Pleura's modules, and imports run downward only,
config → contract → node, worker → training → pleura (the CLI) → benchmarks.

Every import counts, at module level or inside a function, under ``TYPE_CHECKING`` or not.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pleura.installation import foreign_packages

REPO = Path(__file__).resolve().parent.parent

LAYERS = {"config": 0, "contract": 1, "node": 2, "worker": 2, "training": 3, "pleura": 4, "benchmarks": 5}


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    file: Path
    line: int
    name: str
    """The name as the import statement writes it."""


def project_modules(root: Path, packages=tuple(LAYERS)) -> dict[str, Path]:
    """Dotted module name → file, for every ``.py`` file of the packages under ``root``."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")) if (root / package).is_dir() else []:
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The longest project module that ``name`` is or lies in."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def import_edges(modules: dict[str, Path]) -> list[Edge]:
    """Every import of one project module by another (relative imports resolved)."""
    edges = []
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[tuple[str, str]] = []
            if isinstance(node, ast.Import):
                targets = [(alias.name, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if package else []
                    source = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    source = node.module or ""
                for alias in node.names:
                    # `from a import b`: b may be a module of a, or a name defined in a
                    full = f"{source}.{alias.name}" if source else alias.name
                    targets.append((full if _owner(full, modules) == full else source, full))
            for name, written in targets:
                owner = _owner(name, modules)
                if owner is not None and owner != module:
                    edges.append(Edge(module, owner, path, node.lineno, written))
    return edges


def circles(modules: dict[str, Path], edges: list[Edge]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iteratively)."""
    graph: dict[str, set[str]] = {module: set() for module in modules}
    for edge in edges:
        graph[edge.importer].add(edge.imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def upward_imports(edges: list[Edge]) -> list[Edge]:
    """Imports of a higher layer (config: of any other package)."""
    wrong = []
    for edge in edges:
        low, high = edge.importer.split(".")[0], edge.imported.split(".")[0]
        if LAYERS[high] > LAYERS[low] or (low == "config" and high != "config"):
            wrong.append(edge)
    return wrong


def layer_problems(root: Path) -> list[str]:
    """What breaks the plan under ``root``, one line each; there are no exceptions."""
    modules = project_modules(root)
    edges = import_edges(modules)
    problems = [f"import circle: {' <-> '.join(component)}" for component in circles(modules, edges)]
    problems += [
        f"{edge.file.relative_to(root)}:{edge.line}: {edge.importer} imports {edge.name} "
        f"({edge.imported.split('.')[0]} is above {edge.importer.split('.')[0]})"
        for edge in upward_imports(edges)
    ]
    return problems


def test_no_circles_and_no_upward_imports():
    problems = layer_problems(REPO)
    assert not problems, "\n".join(problems)


def test_the_check_finds_a_circle_and_an_upward_import(tmp_path):
    files = {
        "config/__init__.py": "",
        "config/settings.py": "from training import trainer\n",  # config imports a project package
        "node/__init__.py": "",
        "node/a.py": "def f():\n    from . import b\n",  # function-level, relative
        "node/b.py": "from node.a import f\n",
        "worker/__init__.py": "",
        "worker/run.py": "import pleura.cli\n",  # worker reaching up into the CLI
        "training/__init__.py": "",
        "training/trainer.py": "from node import a\n",  # downward: fine
        "pleura/__init__.py": "",
        "pleura/cli.py": "from training.trainer import x\n",  # downward: fine
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    problems = layer_problems(tmp_path)
    assert "import circle: node.a <-> node.b" in problems
    assert any(p.startswith("worker/run.py:1: worker.run imports pleura.cli ") for p in problems), problems
    assert any(p.startswith("config/settings.py:1: config.settings imports training.trainer ") for p in problems), problems
    assert len(problems) == 3, problems


def test_a_package_that_shadows_ours_stops_pleura_in_one_line(tmp_path):
    """Another distribution's top-level `config` ahead of ours on sys.path: `pleura` says which
    module comes from where and exits 2, before anything else is imported."""
    (tmp_path / "shadow" / "config").mkdir(parents=True)
    (tmp_path / "shadow" / "config" / "__init__.py").write_text("")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "shadow"), str(REPO)])}
    done = subprocess.run([sys.executable, "-m", "pleura.cli", "config"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "'config' comes from" in lines[0] and str(tmp_path / "shadow") in lines[0], lines
    assert foreign_packages() == []  # the tests' own environment is whole


# --- imports inside function bodies ---------------------------------------------------------------

# DESIGN.md: "An import inside a function body is for an optional heavy dependency, not a way
# around the layers". The function-body imports of project modules left in the layers below the
# CLI, each with a comment saying why (keeping torch out of the node, the ledger out of the worker,
# or a heavy dependency out of a process that does not need it). The number may only go down.
BELOW_THE_CLI = ("config", "contract", "node", "worker", "training")
FUNCTION_BODY_IMPORTS_LEFT = 10


def function_body_imports(root: Path, packages=BELOW_THE_CLI) -> list[str]:
    """``file:line imports name`` for each import of a project module inside a function body."""
    modules = project_modules(root, packages=tuple(LAYERS))
    found = []
    for module, path in project_modules(root, packages).items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                names: list[str] = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    if node.level:
                        base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                        names = [".".join([*base, *([node.module] if node.module else [])])]
                    else:
                        names = [node.module or ""]
                for name in names:
                    if _owner(name, modules) is not None:
                        found.append(f"{path.relative_to(root)}:{node.lineno} imports {name}")
    return sorted(set(found))


def test_function_body_imports_of_project_modules_only_go_down():
    found = function_body_imports(REPO)
    assert len(found) <= FUNCTION_BODY_IMPORTS_LEFT, (
        f"{len(found)} function-body imports of project modules (at most {FUNCTION_BODY_IMPORTS_LEFT}): "
        "move the new ones to module level, or say in a comment which heavy dependency they keep out:\n"
        + "\n".join(found)
    )


# --- what a worker process loads -----------------------------------------------------------------

LEDGER_CHECK = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
ledger = sorted(m for m in sys.modules if m == "node.ledger" or m.startswith("node.ledger."))
tables = []
if "sqlalchemy" in sys.modules:
    from sqlalchemy import MetaData, Table
    for module_name, module in list(sys.modules.items()):
        if module_name.split(".")[0] in ("config", "contract", "node", "worker", "training", "pleura"):
            for attribute, value in vars(module).items():
                if isinstance(value, (Table, MetaData)) or hasattr(value, "__table__"):
                    tables.append(f"{module_name}.{attribute}")
print("ledger modules:", ledger, "tables:", tables)
assert not ledger and not tables
"""


def test_the_worker_loads_no_ledger(tmp_path):
    """ARCHITECTURE.md: workers never open the ledger, and do not even load its modules or its
    tables: the analysis tasks (radiograph and CT) and the worker's Celery app import none of it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PLEURA_STORAGE_DIR": str(tmp_path)}
    for entry in ("worker.tasks", "worker.ct_tasks", "worker.startup", "pleura.worker_app"):
        done = subprocess.run([sys.executable, "-c", LEDGER_CHECK, entry], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{entry}: {done.stdout}{done.stderr[-2000:]}"


# --- what the node loads ---------------------------------------------------------------------------

NETWORK_LIBRARIES_CHECK = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
loaded = sorted(m for m in ("torch", "torchvision", "onnxruntime", "monai", "segmentation_models_pytorch") if m in sys.modules)
print("network libraries loaded:", loaded)
assert not loaded
"""


def test_the_node_loads_no_network_library(tmp_path):
    """The node (the SCP, ledger, export, worklist API and its previews' routes) never runs a
    network: it does not load torch or ONNX Runtime, which cost it seconds at start and hundreds of
    MB of memory beside the images it receives. A preview is drawn by a function that loads them
    when first asked (node/api/previews.py)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PLEURA_STORAGE_DIR": str(tmp_path)}
    for entry in ("node.service", "node.celery_entry", "node.api.app"):
        done = subprocess.run([sys.executable, "-c", NETWORK_LIBRARIES_CHECK, entry], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{entry}: {done.stdout}{done.stderr[-2000:]}"
