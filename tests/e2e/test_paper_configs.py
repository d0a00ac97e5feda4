"""The paper benchmark configs (configs/{voc,ade,cityscapes}): every one loads with the paper's
protocol (docs/protocol.md §5), builds its task and model, and fails clearly without its dataset; and
scripts/run_benchmark.sh runs a whole benchmark folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ucdseg.config import load_config
from ucdseg.engine.build import build_task, joint_task, open_dataset
from ucdseg.methods import get_method
from ucdseg.models import build_model

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "src" / "ucdseg" / "configs"

# Written by hand from the paper (docs/protocol.md §1, §5): folder -> (dataset, task, setting, classes per step).
BENCHMARKS = {
    "voc/19-1-disjoint": ("voc", "19-1", "disjoint", [20, 1]),
    "voc/19-1-overlapped": ("voc", "19-1", "overlapped", [20, 1]),
    "voc/15-5-disjoint": ("voc", "15-5", "disjoint", [16, 5]),
    "voc/15-5-overlapped": ("voc", "15-5", "overlapped", [16, 5]),
    "voc/15-1-disjoint": ("voc", "15-1", "disjoint", [16, 1, 1, 1, 1, 1]),
    "voc/15-1-overlapped": ("voc", "15-1", "overlapped", [16, 1, 1, 1, 1, 1]),
    "voc/10-1-overlapped": ("voc", "10-1", "overlapped", [11] + [1] * 10),
    "ade/100-50": ("ade", "100-50", "overlapped", [101, 50]),
    "ade/100-10": ("ade", "100-10", "overlapped", [101, 10, 10, 10, 10, 10]),
    "ade/50-50": ("ade", "50-50", "overlapped", [51, 50, 50]),
    "cityscapes/17-2": ("cityscapes", "17-2", "overlapped", [18, 2]),
    "cityscapes/13-6": ("cityscapes", "13-6", "overlapped", [14, 6]),
    "cityscapes/13-1": ("cityscapes", "13-1", "overlapped", [14, 1, 1, 1, 1, 1, 1]),
}
METHODS = {"ft": "ft", "lwf": "lwf", "ilt": "ilt", "mib": "mib", "mib_ucd": "mib+ucd", "plop": "plop",
           "plop_ucd": "plop+ucd", "joint": "joint"}
# Configs beside a folder's published ones: file -> (method, run-name suffix). MiB at UNKD 10 on 15-1,
# the base of mib+ucd's paired gain at equal KD weight (docs/benchmarks.md).
EXTRA_CONFIGS = {f"voc/15-1-{setting}/mib_kd10.yaml": ("mib", "mib-kd10") for setting in ("disjoint", "overlapped")}
# The other rows of UCD's Table 1, in its six VOC columns (issue 21), with MiB's protocol but for SDR's.
TABLE1_COLUMNS = [f"voc/{t}-{s}" for t in ("19-1", "15-5", "15-1") for s in ("disjoint", "overlapped")]
TABLE1_METHODS = {"lwf_mc": "lwf-mc", "ewc": "ewc", "pi": "pi", "rw": "rw", "mib_sdr": "mib+sdr"}
# SSUL and DKD (with and without memory) on the VOC overlapped tasks of their READMEs (issue 22).
RELEASE_BENCHMARKS = [f"voc/{t}-overlapped" for t in ("19-1", "15-5", "15-1", "10-1")]
RELEASE_METHODS = {"ssul": "ssul", "ssul_m": "ssul-m", "dkd": "dkd", "dkd_m": "dkd-m"}
for _bench in TABLE1_COLUMNS:
    EXTRA_CONFIGS.update({f"{_bench}/{f}.yaml": (m, m) for f, m in TABLE1_METHODS.items()})
for _bench in RELEASE_BENCHMARKS:
    EXTRA_CONFIGS.update({f"{_bench}/{f}.yaml": (m, m) for f, m in RELEASE_METHODS.items()})
# Written by hand from the releases: (batch, epochs, epochs_next, lr, lr_next, amp, crop, memory) where a
# method's protocol is not MiB's (SPEC-2 §2-4).
PROTOCOLS = {"mib+sdr": (8, 30, None, 0.001, 0.0001, "none", 512, None),
             "ssul": (32, 50, 50, 0.01, 0.01, "fp16", 513, None), "ssul-m": (32, 50, 50, 0.01, 0.01, "fp16", 513, 100),
             "dkd": (32, 60, 60, 0.001, 0.0001, "fp16", 512, None), "dkd-m": (32, 60, 60, 0.001, 0.0001, "fp16", 512, 100)}
ROOTS = {"voc": "VOCdevkit/VOC2012", "ade": "ADEChallengeData2016", "cityscapes": "cityscapes"}
EPOCHS = {"voc": 30, "ade": 60, "cityscapes": 60}
# Written by hand from the releases (issue 12): later-step epochs where they differ from step 0,
# loss-weight overrides, and PLOP's ADE POD factors (VOC preset 0.01 / 0.0005 everywhere else).
EPOCHS_NEXT = {"voc/10-1-overlapped": 10}  # PLOP's scripts/voc/plop_10-1.sh: EPOCHS=10
WEIGHT_OVERRIDES = {"voc/15-1-disjoint/mib.yaml": {"unkd": 100.0},  # MiB issue #43: loss_kd 100 on 15-1
                    "voc/15-1-overlapped/mib.yaml": {"unkd": 100.0},
                    "voc/15-1-disjoint/mib_kd10.yaml": {"unkd": 10.0},  # MiB's preset, as mib_ucd.yaml
                    "voc/15-1-overlapped/mib_kd10.yaml": {"unkd": 10.0}}
POD_FACTORS = {f"ade/{t}/{m}.yaml": (0.001, 0.00001)  # PLOP's scripts/ade/plop_ade_*.sh
               for t in ("100-50", "100-10", "50-50") for m in ("plop", "plop_ucd")}
WEIGHTS = "resnet101-63fe2227.pth"

PAPER_CONFIGS = [f"{bench}/{m}.yaml" for bench in BENCHMARKS for m in METHODS] + list(EXTRA_CONFIGS)


def expected_name(bench: str, method: str) -> str:
    dataset, task, setting, _ = BENCHMARKS[bench]
    short = {"overlapped": "-ov", "disjoint": "-dis"}[setting] if dataset == "voc" else ""
    return f"{dataset}-{task}{short}-{method}"


def file_method(rel: str) -> tuple[str, str]:
    """(method, run-name suffix) of a config file."""
    if rel in EXTRA_CONFIGS:
        return EXTRA_CONFIGS[rel]
    method = METHODS[rel.rsplit("/", 1)[1][: -len(".yaml")]]
    return method, method


@pytest.fixture
def env(tmp_path, monkeypatch):
    """$UCDSEG_DATA and $UCDSEG_WEIGHTS point at (empty) folders of this test."""
    monkeypatch.setenv("UCDSEG_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("UCDSEG_WEIGHTS", str(tmp_path / "weights"))
    return tmp_path


def test_the_folders_hold_exactly_the_paper_configs():
    found = sorted(str(p.relative_to(CONFIGS)) for d in ("voc", "ade", "cityscapes")
                   for p in (CONFIGS / d).rglob("*.yaml") if not p.name.startswith("_"))
    assert found == sorted(PAPER_CONFIGS)
    assert (REPO / "configs").resolve() == CONFIGS.resolve()  # the root configs/ is the packaged one


@pytest.mark.parametrize("rel", PAPER_CONFIGS)
def test_config_has_the_paper_protocol_task_and_a_clear_missing_data_error(rel, env):
    bench = rel.rsplit("/", 1)[0]
    dataset, task_name, setting, sizes = BENCHMARKS[bench]
    method, suffix = file_method(rel)
    cfg = load_config(CONFIGS / rel)

    assert cfg.name == expected_name(bench, suffix)
    assert (cfg.data.dataset, cfg.task.name, cfg.data.setting, cfg.method.name) == (dataset, task_name, setting, method)
    assert get_method(cfg.method.name).name == method
    assert cfg.task.order is None and cfg.task.order_seed is None
    assert cfg.method.weights == WEIGHT_OVERRIDES.get(rel, {})
    if method.startswith("plop"):  # the options PLOP's terms read (defaults: the VOC preset)
        options = get_method(method).resolve_options(cfg.method.options)
        assert (options["pod_factor"], options["pod_last_factor"]) == POD_FACTORS.get(rel, (0.01, 0.0005))
    else:
        assert "pod_factor" not in cfg.method.options
    # docs/protocol.md §5
    assert (cfg.model.backbone, cfg.model.output_stride) == ("resnet101", 16)
    assert cfg.model.first_block_dilation == "release"  # layer4 dilated as in MiB's, PLOP's and UCD's ResNet
    t = cfg.train
    batch, epochs, epochs_next, lr, lr_next, amp, crop, memory = PROTOCOLS.get(
        method, (24, EPOCHS[dataset], EPOCHS_NEXT.get(bench), 0.01, 0.001, "none", 512, None))
    assert (cfg.data.crop_size, cfg.data.eval_crop_size, cfg.data.scale_min, cfg.data.scale_max) == (crop, 512, 0.5, 2.0)
    assert (t.batch_size, t.epochs, t.epochs_next, t.iterations, t.iterations_next) == (
        batch, epochs, epochs_next, None, None)
    assert (t.lr, t.lr_next, t.momentum, t.nesterov, t.weight_decay, t.poly_power) == (lr, lr_next, 0.9, True,
                                                                                        1e-4, 0.9)
    assert t.amp == amp and t.step0_from is None and cfg.data.memory.size == memory
    assert cfg.data.score_background is False
    # paths come from the environment
    assert cfg.model.pretrained == f"{env / 'weights'}/{WEIGHTS}"
    root = f"{env / 'data'}/{ROOTS[dataset]}"
    assert cfg.data.root == root

    task = build_task(cfg)
    assert (task.dataset, task.name, task.classes_per_step) == (dataset, task_name, sizes)

    with pytest.raises((FileNotFoundError, ValueError), match="not found: " + root):
        open_dataset(cfg, "train")


def test_run_names_are_distinct():
    names = [load_config(CONFIGS / rel).name for rel in PAPER_CONFIGS]
    assert len(set(names)) == len(names)


def fake_results(cfg, seed: int, miou_all: float) -> dict:
    """A finished run's results.json for ``cfg`` (as the runner writes it), every mIoU ``miou_all``."""
    from ucdseg.config import to_dict

    groups = {"old": miou_all, "new": miou_all, "all": miou_all}
    task = build_task(cfg)
    steps = [{"step": i, "classes": s, "miou": {"without_background": groups, "with_background": groups}}
             for i, s in enumerate(task.steps)]
    return {"method": cfg.method.name, "seed": seed, "weights": get_method(cfg.method.name).weights(cfg.method.weights),
            "config": to_dict(cfg), "steps": steps,
            "task": {"dataset": task.dataset, "name": task.name, "setting": cfg.data.setting, "steps": task.steps}}


@pytest.mark.parametrize("setting", ["disjoint", "overlapped"])
def test_report_pairs_mib_ucd_with_mib_at_equal_kd_weight_on_15_1(setting, env):
    """mib+ucd (UNKD 10) pairs with mib_kd10.yaml (UNKD 10, MiB's default weights), not with
    mib.yaml (UNKD 100, its own row 'mib [unkd=100]'); the paper's MiB cell is shown beside the row
    of MiB's default weights (docs/benchmarks.md)."""
    from ucdseg.reporting import aggregate, aggregate_markdown, run_label, ucd_gains

    folder = CONFIGS / f"voc/15-1-{setting}"
    # as scripts/run_benchmark.sh runs them: the first trains step 0, the others reuse it
    runs = {m: load_config(folder / f"{m}.yaml", [f"train.step0_from=runs/voc-15-1-{setting}-mib"] if m != "mib" else [])
            for m in ("mib", "mib_kd10", "mib_ucd")}
    results = [fake_results(cfg, seed, value) for seed in (0, 1)
               for cfg, value in ((runs["mib"], 0.30), (runs["mib_kd10"], 0.20), (runs["mib_ucd"], 0.25))]
    assert [run_label(r) for r in results[:3]] == ["mib [unkd=100]", "mib", "mib+ucd"]
    (gain,) = ucd_gains(results)
    assert (gain["method"], gain["base"], gain["seeds"]) == ("mib+ucd", "mib", [0, 1])
    assert gain["without_background_all_mean"] == pytest.approx(0.05)  # 0.25 - 0.20: against UNKD 10
    table = aggregate_markdown(aggregate(results), paper=True).splitlines()
    cells = {line.split("|")[2].strip(): line.split("|")[-2].strip() for line in table if line.startswith("| voc")}
    paper = {"disjoint": "46.2/12.9/37.9", "overlapped": "35.1/13.5/29.7"}[setting]
    assert cells == {"mib [unkd=100]": "-", "mib": paper, "mib+ucd": {"disjoint": "53.3/14.4/43.5",
                                                                         "overlapped": "51.9/13.1/42.2"}[setting]}


def test_paths_default_to_data_and_weights_in_the_working_directory(monkeypatch):
    monkeypatch.delenv("UCDSEG_DATA", raising=False)
    monkeypatch.delenv("UCDSEG_WEIGHTS", raising=False)
    cfg = load_config(CONFIGS / "voc/15-1-overlapped/mib_ucd.yaml")
    assert cfg.data.root == "data/VOCdevkit/VOC2012"
    assert cfg.model.pretrained == f"weights/{WEIGHTS}"
    cfg = load_config(CONFIGS / "cityscapes/13-1/plop_ucd.yaml", ["data.root=/x", "model.pretrained=null"])
    assert cfg.data.root == "/x" and cfg.model.pretrained is None


def test_models_build_for_every_distinct_first_step():
    """One resnet101 per distinct step-0 size (joint: all classes in its single step)."""
    firsts = set()
    # every method of a folder shares backbone and task (checked above); joint differs at step 0
    for rel in [f"{bench}/{m}.yaml" for bench in BENCHMARKS for m in ("ft", "joint")]:
        cfg = load_config(CONFIGS / rel, ["model.pretrained=null"])
        task = build_task(cfg)
        if get_method(cfg.method.name).joint:
            task = joint_task(task)
        firsts.add((cfg.model.backbone, cfg.model.output_stride, task.classes_per_step[0]))
    # VOC 20/16/11/21, ADE 101/51/151, Cityscapes 18/14/20 (20 shared with VOC 19-1)
    assert sorted(n for _, _, n in firsts) == [11, 14, 16, 18, 20, 21, 51, 101, 151]
    # The first model is built for real; the others (only the classifier size differs) on the meta
    # device, which runs the same construction code without allocating or initialising weights.
    for i, (backbone, output_stride, n) in enumerate(sorted(firsts)):
        with torch.device("cpu" if i == 0 else "meta"):
            model = build_model(backbone, [n], output_stride=output_stride, pretrained=None)
        assert [conv.out_channels for conv in model.classifier] == [n]
        assert sum(p.numel() for p in model.backbone.parameters()) > 40_000_000  # a ResNet-101


# ------------------------------------------------------------------------ scripts/run_benchmark.sh
def run_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("NPROC", "METHODS", "SHARE_STEP0")}
    full_env.update(PYTHON=sys.executable, DRY_RUN="1", **env)
    return subprocess.run(["bash", str(REPO / "scripts" / "run_benchmark.sh"), *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=120)


def test_run_benchmark_runs_every_method_sharing_step0_then_reports():
    proc = run_script("configs/voc/15-1-overlapped", "seed=3")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    runs = [line for line in lines if " run " in line]
    # the published methods in the script's order, then the folder's other configs (mib_kd10)
    order = ["ft", "lwf", "ilt", "mib", "mib_ucd", "plop", "plop_ucd", "joint", "lwf_mc", "ewc", "pi", "rw",
             "mib_sdr", "ssul", "ssul_m", "dkd", "dkd_m", "mib_kd10"]
    assert [line.split(" run ")[1].split()[0] for line in runs] == [
        f"configs/voc/15-1-overlapped/{m}.yaml" for m in order]
    assert all(line.startswith(f"+ {sys.executable} -m ucdseg.cli run ") and " seed=3" in line for line in runs)
    by = dict(zip(order, runs))
    # each distinct step 0 is trained by its first run (joint: its own single step); the others reuse it
    own = ["ft", "joint", "lwf_mc", "ewc", "pi", "rw", "mib_sdr", "ssul", "dkd"]
    assert all("step0_from" not in by[m] for m in own)
    shares = {m: "ft" for m in ("lwf", "ilt", "mib", "mib_ucd", "plop", "plop_ucd", "mib_kd10")}
    shares.update(ssul_m="ssul", dkd_m="dkd")
    for m, source in shares.items():
        assert by[m].endswith(f"train.step0_from=runs/voc-15-1-ov-{source.replace('_', '-')}"), by[m]
    report = lines[-1]
    assert " -m ucdseg.cli report runs/voc-15-1-ov-ft " in report and "runs/voc-15-1-ov-joint " in report
    assert report.endswith("--output-dir runs/voc-15-1-overlapped-report --paper")


def test_run_benchmark_with_torchrun_and_a_method_subset():
    proc = run_script("configs/ade/100-50", METHODS="mib_ucd mib", NPROC="4", SHARE_STEP0="0")
    assert proc.returncode == 0, proc.stderr
    runs = [line for line in proc.stdout.splitlines() if " run " in line]
    prefix = f"+ {sys.executable} -m torch.distributed.run --standalone --nproc_per_node=4 -m ucdseg.cli run "
    assert runs == [prefix + "configs/ade/100-50/mib_ucd.yaml", prefix + "configs/ade/100-50/mib.yaml"]


def test_run_benchmark_skips_base_files(tmp_path):
    (tmp_path / "_common.yaml").write_text("data:\n  dataset: embedded\n")
    (tmp_path / "shared.yaml").write_text("_base_: _common.yaml\ntask:\n  name: 6-1\n")
    (tmp_path / "zeta.yaml").write_text("_base_: shared.yaml  # the task\nname: z\nmethod:\n  name: ft\n")
    (tmp_path / "mib.yaml").write_text("_base_: 'shared.yaml'\nname: m\nmethod:\n  name: mib\n")
    proc = run_script(str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    runs = [line.split(" run ", 1)[1] for line in proc.stdout.splitlines() if " run " in line]
    assert runs == [f"{tmp_path}/mib.yaml", f"{tmp_path}/zeta.yaml train.step0_from=runs/m"]


@pytest.mark.parametrize("args, env, message", [
    (("configs/voc/nowhere",), {}, "configs/voc/nowhere is not a folder"),
    (("configs/voc/15-1-overlapped",), {"METHODS": "mib typo"}, "typo.yaml does not exist"),
    (("configs/voc/15-1-overlapped", "train.nope=1"), {}, "train.nope"),
    ((), {}, "usage:"),
])
def test_run_benchmark_errors(args, env, message):
    proc = run_script(*args, **env)
    assert proc.returncode != 0 and message in proc.stderr and "ucdseg.cli run" not in proc.stdout
