"""Figures of the code's shape (issue 25), measured, not estimated.

    .venv/bin/python scripts/code_figures.py [--json FILE]

* the longest function in ``engine/`` and in ``cli.py``, and the largest class in ``engine/``
  (lines, from the AST);
* the lines of each module of ``reporting``;
* the walk of one training step: a tiny run's ``Run.train_step(1)`` traced with
  ``sys.setprofile``. The reader reads ``train_step`` and follows every ucdseg function it calls,
  in call order, coming back to the caller after each; a function in the same file is read on,
  a call into another file is one *crossing*, and the reader follows at most ``depth`` crossings
  (1: the files ``train_step`` calls into; 2: also the files those call into). *Files visited*
  counts the distinct source files on the walk; *returns* counts each time the walk enters a file
  it had already left (coming back to the caller included).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "ucdseg"


def _spans(path: Path, kind) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [(node.end_lineno - node.lineno + 1, f"{path.relative_to(SRC)}:{node.name}")
            for node in ast.walk(tree) if isinstance(node, kind)]


def longest(paths, kind) -> dict:
    lines, name = max(span for path in paths for span in _spans(path, kind))
    return {"name": name, "lines": lines}


def walk(depth: int) -> dict:
    """Trace ``Run.train_step(1)`` of a tiny fine-tuning run (see the module's docstring)."""
    import torch

    from ucdseg import threads
    from ucdseg.config import load_config
    from ucdseg.engine.runner import Run

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["UCDSEG_CACHE"] = tmp  # the embedded benchmark is generated there
        cfg = load_config(None, [f"output_dir={tmp}", "name=walk", "device=cpu", "data.dataset=embedded",
                                 "data.embedded_train=64", "data.embedded_val=16",
                                 "data.embedded_size=32", "data.crop_size=32", "task.name=8-2", "model.backbone=resnet18", "model.output_stride=16", "model.output_stride=16",
                                 "model.pretrained=null", "train.batch_size=4", "train.iterations=1",
                                 "train.iterations_next=1", "method.name=mib", "eval.num_images=0",
                                 f"data.cache_dir={tmp}/cache"])
        run = Run(cfg, progress=False)
        run.threads = threads.start(cfg, run.results)  # what Run.run does first
        try:
            run._add_step(run.train_step(0))
            positions: list[str] = []
            stack: list[tuple[str, int] | None] = []  # per frame: (file, file crossings from train_step) or None

            def profile(frame, event, arg):
                if event not in ("call", "return"):
                    return
                if event == "return":
                    if stack and stack.pop() is not None and stack and stack[-1] is not None:
                        positions.append(stack[-1][0])
                    return
                path = frame.f_code.co_filename
                caller = stack[-1] if stack else None
                entry = None
                if path.startswith(str(SRC)) and (caller is not None or not stack):
                    name = str(Path(path).relative_to(SRC))
                    crossings = 0 if caller is None else caller[1] + (name != caller[0])
                    if crossings <= depth:
                        entry = (name, crossings)
                        positions.append(name)
                stack.append(entry)

            sys.setprofile(profile)
            try:
                run.train_step(1)
            finally:
                sys.setprofile(None)
        finally:
            run.folder.release()
            run.log.close()
    walked = [p for i, p in enumerate(positions) if i == 0 or p != positions[i - 1]]
    seen: set[str] = set()
    returns = 0
    for p in walked:
        returns += p in seen
        seen.add(p)
    return {"depth": depth, "files_visited": len(seen), "returns": returns, "files": sorted(seen),
            "walk": walked}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    engine = sorted((SRC / "engine").glob("*.py"))
    reporting = sorted((SRC / "reporting").glob("*.py")) if (SRC / "reporting").is_dir() else [SRC / "reporting.py"]
    figures = {
        "longest_function_engine": longest(engine, (ast.FunctionDef, ast.AsyncFunctionDef)),
        "longest_function_cli": longest([SRC / "cli.py"], (ast.FunctionDef, ast.AsyncFunctionDef)),
        "largest_class_engine": longest(engine, ast.ClassDef),
        "reporting_lines": {str(p.relative_to(SRC)): len(p.read_text().splitlines()) for p in reporting},
        "train_step_walk": [walk(1), walk(2)],
    }
    print(json.dumps({k: v for k, v in figures.items() if k != "train_step_walk"}, indent=1))
    for w in figures["train_step_walk"]:
        print(f"train_step walk, {w['depth']} file crossing(s) deep: {w['files_visited']} files visited, "
              f"{w['returns']} returns")
        print("  " + " -> ".join(w["walk"]))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
