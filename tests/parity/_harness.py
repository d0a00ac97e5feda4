"""Helpers of the parity generators (make_*.py): run a release's own lines, unchanged, on our inputs.

A rule that lives inline in a release's training loop is executed by parsing the release file with
``ast``, picking the statements (found by how their source starts, not by line numbers, so a moved
line still resolves) and executing them, compiled with the release file's name and line numbers,
in a namespace that holds our inputs and stand-ins for the surrounding objects (``self``, ``opts``,
the models). Nothing of the release is copied into this repository.
"""

from __future__ import annotations

import ast
import json
import sys
import types
from pathlib import Path
from typing import Any, Iterator

import numpy as np


class ReleaseFile:
    """A parsed release source file."""

    def __init__(self, root: Path, relpath: str):
        self.path = Path(root) / relpath
        self.source = self.path.read_text()
        self.tree = ast.parse(self.source, filename=str(self.path))

    def segment(self, node: ast.AST) -> str:
        return ast.get_source_segment(self.source, node) or ""

    def function(self, qualname: str) -> ast.FunctionDef:
        """``"func"`` or ``"Class.method"`` at module level."""
        scope: list[ast.stmt] = self.tree.body
        node = None
        for part in qualname.split("."):
            node = next((n for n in scope if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part), None)
            if node is None:
                raise LookupError(f"{qualname} not found in {self.path}")
            scope = node.body
        assert isinstance(node, ast.FunctionDef)
        return node

    def _bodies(self, node: ast.AST) -> Iterator[list[ast.stmt]]:
        for field in ("body", "orelse", "finalbody", "handlers"):
            block = getattr(node, field, None)
            if isinstance(block, list) and block and isinstance(block[0], (ast.stmt, ast.excepthandler)):
                yield block
                for child in block:
                    yield from self._bodies(child)

    def find(self, within: ast.AST, prefix: str, kind: type = ast.stmt) -> ast.stmt:
        """The first statement (depth first, in source order) under ``within`` whose source starts with ``prefix``."""
        for block in self._bodies(within):
            for stmt in block:
                if isinstance(stmt, kind) and self.segment(stmt).startswith(prefix):
                    return stmt
        raise LookupError(f"no statement starting with {prefix!r} in {self.path}")

    def span(self, within: ast.AST, first: str, last: str) -> list[ast.stmt]:
        """The consecutive statements of one block, from the one starting with ``first`` to the one starting with ``last``."""
        for block in self._bodies(within):
            starts = [i for i, s in enumerate(block) if self.segment(s).startswith(first)]
            ends = [i for i, s in enumerate(block) if self.segment(s).startswith(last)]
            if starts and ends and ends[-1] >= starts[0]:
                return block[starts[0]:ends[-1] + 1]
        raise LookupError(f"no block from {first!r} to {last!r} in {self.path}")

    def run(self, statements: list[ast.stmt], namespace: dict[str, Any]) -> dict[str, Any]:
        """Execute the statements (unchanged) in ``namespace``; returns it. Records the lines run."""
        module = ast.Module(body=list(statements), type_ignores=[])
        exec(compile(module, str(self.path), "exec"), namespace)
        return namespace

    def lines(self, statements: list[ast.stmt]) -> str:
        return ",".join(f"{s.lineno}-{s.end_lineno}" for s in statements)


def stub_module(name: str, **attributes: Any) -> types.ModuleType:
    """Register an empty stand-in module (for a third-party import the rules do not use)."""
    module = types.ModuleType(name)
    for key, value in attributes.items():
        setattr(module, key, value)
    sys.modules[name] = module
    return module


def namespace_package(name: str, directory: Path) -> types.ModuleType:
    """Register package ``name`` for ``directory`` *without* running its ``__init__.py``."""
    module = types.ModuleType(name)
    module.__path__ = [str(directory)]
    sys.modules[name] = module
    return module


class ShuffleRecorder:
    """Stands in for ``numpy.random.shuffle``: shuffles with numpy's global RNG (the same draws) and
    records, per call, the list before shuffling and the permutation applied."""

    def __init__(self, shuffle):
        self._shuffle = shuffle
        self.calls: list[tuple[list, list[int]]] = []

    def __call__(self, x):
        before = list(x)
        perm = list(range(len(before)))
        self._shuffle(perm)
        x[:] = [before[i] for i in perm]
        self.calls.append((before, perm))


def json_array(obj: Any) -> np.ndarray:
    """A JSON document as a 0-d unicode array (npz-friendly, no pickle)."""
    return np.array(json.dumps(obj))
