"""TensorBoard is installed with the package, and a run without it says so (issue 14, item 6)."""

import sys
import tomllib
from pathlib import Path

from ucdseg.engine.runner import Run

ROOT = Path(__file__).resolve().parents[2]


def test_tensorboard_is_a_runtime_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [d.split(">")[0].split("=")[0].strip() for d in project["dependencies"]]
    assert "tensorboard" in names
    import torch.utils.tensorboard  # noqa: F401  (the trainer's import works in the default install)


def test_run_without_tensorboard_says_once_that_logging_is_off(make_config, tiny_model, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    trainer = Run(make_config("no-tb"), progress=False)
    assert trainer.writer is None
    lines = [line for line in capsys.readouterr().err.splitlines() if "TensorBoard" in line]
    assert len(lines) == 1
    assert "logging is off" in lines[0] and "pip install tensorboard" in lines[0]
    assert str(trainer.folder.path / "tensorboard") in lines[0]
