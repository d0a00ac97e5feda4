"""``ucdseg demo``: the packaged demo config, several methods sharing step 0, the comparison files."""

from __future__ import annotations

import json

import torch

from conftest import base_overrides
from ucdseg import cli
from ucdseg.config import load_config
from ucdseg.cli import packaged_config


def test_packaged_demo_config_is_the_documented_one():
    cfg = load_config(str(packaged_config("demo.yaml")), [])
    assert (cfg.data.dataset, cfg.task.name, cfg.model.backbone, cfg.model.pretrained) == \
        ("embedded", "4-3-3", "resnet18", "embedded")
    assert len(cfg.task.name.split("-")) >= 3  # at least 3 steps


def test_demo_runs_each_method_shares_step0_and_writes_the_comparison(tiny_benchmark, tmp_path, tiny_model, capsys):
    keep = [o for o in base_overrides(tiny_benchmark, tmp_path)
            if o.split("=")[0] not in ("output_dir", "name", "method.name", "seed")]
    out = tmp_path / "demo"
    args = ["--quiet", "demo", "--methods", "ft,mib,joint", "--output-dir", str(out), "--seed", "3",
            *keep, "model.pretrained=null"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    for name in ("ft", "mib", "joint"):
        results = json.loads((out / name / "results.json").read_text())
        assert results["seed"] == 3 and results["config"]["method"]["name"] == name
        assert f"| {name} |" in printed
    assert {p.name for p in out.iterdir()} >= {"comparison.md", "comparison.csv", "comparison.png"}
    assert "| ft |" in (out / "comparison.md").read_text() and "mib" in (out / "comparison.csv").read_text()

    # mib reused ft's step 0 (same weights), joint trained its own single step
    a = torch.load(out / "ft" / "checkpoints" / "step0.pt", weights_only=True)["model"]
    b = torch.load(out / "mib" / "checkpoints" / "step0.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    mib = json.loads((out / "mib" / "results.json").read_text())
    assert mib["config"]["train"]["step0_from"] == str(out / "ft")
    assert len(json.loads((out / "joint" / "results.json").read_text())["steps"]) == 1

    # running it again continues (every run is finished) without retraining anything
    stamp = (out / "mib" / "checkpoints" / "step1.pt").stat().st_mtime_ns
    assert cli.main(args) == 0
    assert (out / "mib" / "checkpoints" / "step1.pt").stat().st_mtime_ns == stamp
