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
    assert (cfg.data.dataset, cfg.task.name, cfg.model.backbone, cfg.model.output_stride, cfg.model.pretrained) == \
        ("embedded", "4-3-3", "embedded_resnet", 4, "embedded")
    assert len(cfg.task.name.split("-")) >= 3  # at least 3 steps
    # the papers' protocol shape: epochs (not iterations) in every step, later steps at a tenth of the rate
    assert cfg.train.iterations is None and cfg.train.iterations_next is None and cfg.train.epochs_next is None
    assert cfg.train.lr_next == cfg.train.lr / 10


def test_demo_runs_each_method_shares_step0_and_writes_the_comparison(tiny_benchmark, tmp_path, tiny_model, capsys):
    keep = [o for o in base_overrides(tiny_benchmark, tmp_path)
            if o.split("=")[0] not in ("output_dir", "name", "method.name", "seed")]
    out = tmp_path / "demo"
    args = ["--quiet", "demo", "--methods", "ft,mib,lwf-mc,joint", "--output-dir", str(out), "--seed", "3",
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
    # MiB's LwF-MC trains step 0 with BCE: it trains its own step 0
    lwf_mc = json.loads((out / "lwf-mc" / "results.json").read_text())
    assert lwf_mc["config"]["train"]["step0_from"] is None
    c = torch.load(out / "lwf-mc" / "checkpoints" / "step0.pt", weights_only=True)["model"]
    assert not torch.equal(a["classifier.0.weight"], c["classifier.0.weight"])

    # running it again continues (every run is finished) without retraining anything
    stamp = (out / "mib" / "checkpoints" / "step1.pt").stat().st_mtime_ns
    assert cli.main(args) == 0
    assert (out / "mib" / "checkpoints" / "step1.pt").stat().st_mtime_ns == stamp
