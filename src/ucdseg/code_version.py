"""Which code produced a result: the package version always, the git commit from a checkout.

``results.json`` records :func:`code_version` (``"code"``, when the run started, and in each
step's record, the code that made the step), so a table can be traced to the code that made it: ``{"version": "0.1.0", "git_commit": "bd1d72b...", "git_dirty": false}`` when the
package is imported from a git checkout of ucdseg (an editable install or ``PYTHONPATH=src``),
``{"version": "0.1.0", "git_commit": null, "git_dirty": null}`` when it is installed from a
wheel. ``git_dirty`` is true when tracked files differ from the commit (untracked files do not
count: a run folder inside the checkout would otherwise make every run dirty).
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

__all__ = ["__version__", "code_version", "describe"]

__version__ = "0.1.0"  # ucdseg.__version__, the version of pyproject.toml


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git, or it hung
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def code_version() -> dict:
    """``{"version", "git_commit", "git_dirty"}`` of the imported ucdseg package (a copy: the git
    commands run once per process, the answer is kept)."""
    return dict(_code_version())


@functools.lru_cache(maxsize=1)
def _code_version() -> tuple:
    return tuple(_read().items())


def _read() -> dict:
    package = Path(__file__).resolve().parent  # the ucdseg package folder
    info = {"version": __version__, "git_commit": None, "git_dirty": None}
    top = _git(["rev-parse", "--show-toplevel"], package)
    # only a checkout of ucdseg itself: the package folder is tracked in it (not a site-packages
    # folder that happens to sit inside some other repository)
    if top is None or _git(["ls-files", "--error-unmatch", "__init__.py"], package) is None:
        return info
    commit = _git(["rev-parse", "HEAD"], package)
    if commit is None:
        return info
    status = _git(["status", "--porcelain", "--untracked-files=no"], Path(top))
    info.update(git_commit=commit, git_dirty=None if status is None else bool(status))
    return info


def describe(info: dict | None) -> str:
    """``0.1.0 (git bd1d72b, dirty)``, ``0.1.0 (git bd1d72b)`` or ``0.1.0``."""
    if not info:
        return "unknown"
    text = str(info.get("version", "?"))
    if info.get("git_commit"):
        text += f" (git {info['git_commit'][:7]}{', dirty' if info.get('git_dirty') else ''})"
    return text
