"""The layers of docs/architecture.md hold (issue 25, item 5): no import runs upward.

Every ``import`` and ``from ... import`` of ``src/ucdseg`` is read with :mod:`ast`: at module
level, inside functions and methods, under ``try`` and under ``if TYPE_CHECKING:`` (an import
made for an annotation only still ties the module to the one it names, so it counts), and so is
``importlib.import_module("ucdseg....")`` with the name written out. Each
module is placed on the floor of its top-level module or package (:data:`FLOORS`, the rows of
the diagram, which a test reads back from the docs). The rule:

* a module imports modules of lower floors;
* on its own floor, only modules of its own package (``engine/runner.py`` imports
  ``engine/build.py``; ``reporting/tables.py`` imports ``reporting/results.py``);
* never a module of a higher floor.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "ucdseg"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"

#: The floors, bottom first: the top-level modules and packages of ``ucdseg`` on each (``__init__``
#: is ``ucdseg/__init__.py``, the package's face: ``ucdseg.run`` and ``__version__``).
FLOORS: tuple[tuple[str, ...], ...] = (
    ("io", "step_range", "code_version", "stats", "paper", "tasks", "configs_index", "threads", "registry"),  # pure, or files only
    ("label_maps",),  # a step's label tables, over a Task
    ("losses", "models"),  # tensors in, tensors out
    ("data",),  # readers, per-step views and image lists, exemplar sampling
    ("methods", "embedded", "figures"),  # methods as declarations, the embedded benchmark, mask pictures
    ("plugins",),  # user methods and datasets into the registries
    ("config",),  # RunConfig, checked against the registries when it is read
    ("engine",),  # a run
    ("reporting", "predict", "runs_list"),  # what reads results and checkpoints
    ("device_check",),  # the GPU path's checks (ucdseg device-check, scripts/device_check.sh)
    ("cli", "api"),  # the commands and the Python entry point
    ("__init__",),  # ucdseg.run
)

#: Upward imports left only because they belong to another branch of issue 25; each names its
#: owner. The lead empties this after merging: an entry that no longer occurs fails the test.
KNOWN_UPWARD: dict[tuple[str, str], str] = {}  # (importer, imported top-level): why it is tolerated; none


def module_name(path: Path, src: Path = SRC) -> str:
    parts = path.relative_to(src).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level(module: str) -> str:
    """``engine`` for ``ucdseg.engine.runner``, ``__init__`` for ``ucdseg`` itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def modules(src: Path = SRC) -> dict[str, Path]:
    return {module_name(p, src): p for p in sorted((src / "ucdseg").rglob("*.py"))}


def imports(path: Path, src: Path = SRC) -> list[tuple[int, str]]:
    """``(line, module)`` of every import of a ucdseg module in ``path``, wherever it stands."""
    name, known = module_name(path, src), set(modules(src))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "ucdseg"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                target = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "ucdseg":
                continue
            for alias in node.names:  # `from . import build` imports the module ucdseg.engine.build
                found.append((node.lineno, f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)
              and str(node.args[0].value).split(".")[0] == "ucdseg"):
            found.append((node.lineno, node.args[0].value))
    return sorted(set(found))  # `from .x import a, b` is one import of ucdseg.x


def upward_imports(src: Path = SRC) -> list[tuple[str, int, str, str]]:
    """``(importer, line, imported, why)`` of every import that breaks the rule of the module docstring."""
    floors = {name: i for i, names in enumerate(FLOORS) for name in names}
    found = []
    for name, path in modules(src).items():
        mine = top_level(name)
        for line, target in imports(path, src):
            theirs = top_level(target)
            if theirs == mine or floors[theirs] < floors[mine]:
                continue
            where = "the same floor as" if floors[theirs] == floors[mine] else "a floor above"
            found.append((name, line, target, f"{theirs} is on {where} {mine}"))
    return found


def test_every_module_is_on_a_floor():
    placed = [name for names in FLOORS for name in names]
    assert len(placed) == len(set(placed)), "a name is on two floors"
    present = {top_level(name) for name in modules()}
    assert present - set(placed) == set(), "modules on no floor: add them to FLOORS and to docs/architecture.md"
    assert set(placed) - present == set(), "FLOORS names modules that do not exist"


def test_no_import_runs_upward():
    found = upward_imports()
    unknown = [f"{name}:{line} imports {target} ({why})" for name, line, target, why in found
               if (name, top_level(target)) not in KNOWN_UPWARD]
    assert unknown == [], "imports that run upward:\n" + "\n".join(unknown)
    stale = set(KNOWN_UPWARD) - {(name, top_level(target)) for name, _, target, _ in found}
    assert stale == set(), f"no longer imported upward: remove {sorted(stale)} from KNOWN_UPWARD"


def test_the_checker_sees_imports_in_functions_and_type_checking_blocks_and_same_floor_ones(tmp_path):
    package = tmp_path / "ucdseg"
    (package / "engine").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "engine/__init__.py": "from .runner import run\n",  # its own package: allowed
        "reporting.py": "",
        "stats.py": "import numpy\n",
        "tasks.py": "from . import stats\n",  # the same floor, another module
        "paper.py": "import importlib\n\ndef f():\n    return importlib.import_module('ucdseg.engine')\n",
        "io.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .engine import runner\n",
        "engine/runner.py": "from .. import io, stats\n\ndef run():\n    from .. import reporting\n"
                            "    import ucdseg.reporting\n\nclass Run:\n    def write(self):\n"
                            "        from ..reporting import write_run_reports\n",
    }
    for name, text in files.items():
        (package / name).write_text(text)
    found = sorted((name, line, target) for name, line, target, _ in upward_imports(tmp_path))
    assert found == [("ucdseg.engine.runner", 4, "ucdseg.reporting"), ("ucdseg.engine.runner", 5, "ucdseg.reporting"),
                     ("ucdseg.engine.runner", 9, "ucdseg.reporting"), ("ucdseg.io", 3, "ucdseg.engine.runner"),
                     ("ucdseg.paper", 4, "ucdseg.engine"), ("ucdseg.tasks", 1, "ucdseg.stats")]


def diagram_floors(text: str) -> list[set[str]]:
    """The top-level names on each floor of the diagram under "## The layers", bottom first: every
    ``name.py`` and ``name/`` that is a top-level module or package of ``src/ucdseg``."""
    block = re.search(r"## The layers.*?```\n(.*?)```", text, re.S).group(1)
    floors = [chunk for chunk in re.split(r"\n\s*─+\s*\n", block) if chunk.strip()]
    names = []
    for chunk in floors:
        found = set()
        for match in re.finditer(r"(?<![\w/.])([A-Za-z_]\w*)(\.py\b|/)", chunk):
            name, kind = match.groups()
            if (kind == ".py" and (PACKAGE / f"{name}.py").is_file()) or (kind == "/" and (PACKAGE / name).is_dir()):
                found.add(name)
        names.append(found)
    return names[::-1]


def test_the_diagram_of_the_docs_is_this_table():
    drawn = diagram_floors(DOCS.read_text(encoding="utf-8"))
    assert drawn == [set(names) for names in FLOORS]


def test_the_engine_draws_through_figures_and_never_imports_the_reports():
    """The engine writes results.json and draws a step's predictions (:mod:`ucdseg.figures`); the
    reports are written by the caller's ``reports=`` (:func:`ucdseg.engine.run`)."""
    used = {top_level(target) for name, path in modules().items() if top_level(name) == "engine"
            for _, target in imports(path)}
    assert "reporting" not in used and {"figures", "stats"} <= used
