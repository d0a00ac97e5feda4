"""The engine's protocol knobs (issue 12): evaluation conventions at intermediate steps
(``eval.images``, ``eval.unseen``), BatchNorm modes (``train.bn``), the process-count warnings, the
methods' diagnostics in the logs, and old run directories without the new keys. The two-process
comparisons are in ``tests/e2e/test_distributed.py``.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import tiny_build_model
from ucdseg.config import ConfigError, RunConfig, load_config, to_dict
from ucdseg.engine import run
from ucdseg.engine.process_group import Dist
from ucdseg.engine.build import build_task, open_dataset, val_data
from ucdseg.engine.evaluation import confusion_matrix
from ucdseg.engine.runner import Run, config_differences, distributed_notes
from ucdseg.engine.build import freeze_batchnorm
from ucdseg.methods import LossContext, Method
from ucdseg.methods.registry import register, unregister

CONVENTIONS = list(itertools.product(("all", "seen"), ("ignore", "background")))
UNSEEN = {9, 10}  # embedded 8-2: classes of step 1, unseen after step 0


def scalars(run_dir) -> dict[str, list[float]]:
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = accumulator.EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# --------------------------------------------------------------------- evaluation conventions
def confusion(cfg: RunConfig, step: int, model: torch.nn.Module) -> tuple[torch.Tensor, int]:
    task = build_task(cfg)
    val = val_data(cfg, task, open_dataset(cfg, "val", prepare=False), step)
    cm = confusion_matrix(model, DataLoader(val, batch_size=16), len(task.seen(step)), torch.device("cpu"), progress=False)
    return cm.mat, len(val)


def test_eval_conventions_differ_after_step_0_and_agree_after_the_last_step(make_config):
    torch.manual_seed(0)
    models = {0: tiny_build_model("tiny", [9]).eval(), 1: tiny_build_model("tiny", [9, 2]).eval()}
    configs = {conv: make_config("conv", f"eval.images={conv[0]}", f"eval.unseen={conv[1]}") for conv in CONVENTIONS}
    val_set = open_dataset(configs["all", "ignore"], "val", prepare=False)
    raw = [np.asarray(val_set.load_mask(i)) for i in range(len(val_set))]
    foreground = [{int(v) for v in np.unique(m)} - {0, 255} for m in raw]
    unseen_only = [i for i, fg in enumerate(foreground) if fg and fg <= UNSEEN]
    assert unseen_only and len(unseen_only) < len(raw)  # the benchmark exercises the filter

    # after step 0 (a model of the 9 step-0 classes)
    after0 = {conv: confusion(cfg, 0, models[0]) for conv, cfg in configs.items()}
    (all_ignore, n_all), (seen_ignore, n_seen) = after0["all", "ignore"], after0["seen", "ignore"]
    assert n_all == len(raw) and n_seen == len(raw) - len(unseen_only)
    # with unseen classes void, the dropped images only add their background pixels (row 0)
    dropped_background = sum(int((raw[i] == 0).sum()) for i in unseen_only)
    assert dropped_background > 0
    assert int(all_ignore[0].sum() - seen_ignore[0].sum()) == dropped_background
    assert torch.equal(all_ignore[1:], seen_ignore[1:])
    # unseen -> background: the unseen pixels of the scored images join the background row
    for images in ("all", "seen"):
        kept = range(len(raw)) if images == "all" else [i for i in range(len(raw)) if i not in unseen_only]
        mat, ignored = after0[images, "background"][0], after0[images, "ignore"][0]
        unseen_pixels = sum(int(np.isin(raw[i], list(UNSEEN)).sum()) for i in kept)
        assert unseen_pixels > 0
        assert int(mat[0].sum() - ignored[0].sum()) == unseen_pixels
        assert torch.equal(mat[1:], ignored[1:])
    assert not torch.equal(after0["all", "background"][0], after0["seen", "background"][0])

    # after the last step every convention scores every image with the same labels
    after1 = {conv: confusion(cfg, 1, models[1]) for conv, cfg in configs.items()}
    reference, n = after1["all", "ignore"]
    assert n == len(raw) and reference.sum() > 0
    for conv, (mat, count) in after1.items():
        assert count == n and torch.equal(mat, reference), conv


def test_run_with_the_plop_convention_records_it(make_config, tiny_model):
    results = run(make_config("plop-conv", "eval.images=seen", "eval.unseen=background"), progress=False)
    assert results["config"]["eval"]["images"] == "seen" and results["config"]["eval"]["unseen"] == "background"
    first, last = results["steps"]
    assert first["num_eval_images"] < last["num_eval_images"] == 16


def test_eval_and_bn_options_are_validated():
    for key, value in (("eval.images", "old"), ("eval.unseen", "void"), ("train.bn", "sync_local")):
        with pytest.raises(ConfigError, match=f"config key '{key}' is '{value}'; expected one of"):
            load_config(None, [f"{key}={value}"])


# ------------------------------------------------------------------------------- BatchNorm
def test_freeze_batchnorm_keeps_statistics_and_trains_the_affine_parameters():
    torch.manual_seed(0)
    model = tiny_build_model("tiny", [3])
    model.train()
    freeze_batchnorm(model)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    assert any(m.training for m in model.modules() if not isinstance(m, torch.nn.BatchNorm2d))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(2, 3, 32, 32)
    model(x).logits.square().mean().backward()
    optimizer.step()
    after = model.state_dict()
    for name, bn in ((n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)):
        assert torch.equal(after[f"{name}.running_mean"], before[f"{name}.running_mean"]), name
        assert torch.equal(after[f"{name}.running_var"], before[f"{name}.running_var"]), name
        assert after[f"{name}.num_batches_tracked"] == before[f"{name}.num_batches_tracked"], name
        assert not torch.equal(after[f"{name}.weight"], before[f"{name}.weight"]), name
    # in eval mode a sample's output does not depend on the rest of the batch
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x[:1]).logits, model(x).logits[:1], rtol=1e-5, atol=1e-6)


def test_frozen_bn_run_never_updates_the_running_statistics(make_config, tiny_model):
    cfg = make_config("frozen", "train.bn=frozen")
    run(cfg, progress=False)
    step0 = torch.load(cfg.run_dir / "checkpoints" / "step0.pt", weights_only=True)["model"]
    step1 = torch.load(cfg.run_dir / "checkpoints" / "step1.pt", weights_only=True)["model"]
    fresh = tiny_build_model("tiny", [9]).state_dict()  # freshly initialised: mean 0, var 1, 0 batches
    stats = [k for k in step0 if "running_" in k or "num_batches_tracked" in k]
    assert stats
    for key in stats:
        assert torch.equal(step0[key], fresh[key]) and torch.equal(step1[key], fresh[key]), key
    weights = [k for k in step0 if k.endswith(".weight") and k.replace("weight", "running_mean") in step0]
    assert any(not torch.equal(step0[k], fresh[k]) for k in weights)  # BN affine parameters trained
    # the default (sync, on one process: plain BatchNorm in training mode) updates them
    cfg = make_config("sync")
    run(cfg, progress=False)
    step0 = torch.load(cfg.run_dir / "checkpoints" / "step0.pt", weights_only=True)["model"]
    assert all(step0[k].item() == 2 for k in stats if "num_batches_tracked" in k)


def test_local_bn_is_sync_bn_on_one_process(make_config, tiny_model):
    a = run(make_config("sync"), progress=False)
    b = run(make_config("local", "train.bn=local"), progress=False)
    assert [s["per_class_iou"] for s in a["steps"]] == [s["per_class_iou"] for s in b["steps"]]


# ------------------------------------------------------------------- process-count warnings
def test_distributed_notes_name_the_process_count_on_rank_0_only():
    cfg = load_config(None, ["method.name=mib+ucd", "train.batch_size=24"])
    ucd = {"unce": 1.0, "unkd": 10.0, "ucd": 0.01}
    cpu = torch.device("cpu")
    (line,) = [n for n in distributed_notes(cfg, ucd, Dist(0, 2, 0, cpu)) if "options.gather" in n]
    assert line.startswith("ucdseg: warning: 2 processes and method.options.gather=false") and "12 images" in line
    assert "\n" not in line
    assert distributed_notes(cfg, ucd, Dist(1, 2, 1, cpu)) == []  # rank 1 says nothing
    assert distributed_notes(cfg, ucd, Dist(0, 1, 0, cpu)) == []  # one process: nothing to say
    gather = load_config(None, ["method.options.gather=true", "train.batch_size=24"])
    assert not any("options.gather" in n for n in distributed_notes(gather, ucd, Dist(0, 2, 0, cpu)))
    no_ucd = {"unce": 1.0, "unkd": 10.0}
    assert not any("options.gather" in n for n in distributed_notes(cfg, no_ucd, Dist(0, 2, 0, cpu)))
    assert not any("options.gather" in n for n in distributed_notes(cfg, {**ucd, "ucd": 0.0}, Dist(0, 2, 0, cpu)))
    # SyncBatchNorm is CUDA-only: on CPU, sync says it acts as local; local and frozen say nothing
    assert any("train.bn=sync" in n for n in distributed_notes(gather, ucd, Dist(0, 2, 0, cpu)))
    for bn in ("local", "frozen"):
        quiet = load_config(None, ["method.options.gather=true", f"train.bn={bn}"])
        assert distributed_notes(quiet, ucd, Dist(0, 2, 0, cpu)) == []
    # accumulation: UCD contrasts micro-batches, even on one process and with gathering
    acc = load_config(None, ["method.options.gather=true", "train.bn=local", "train.batch_size=24", "train.accumulate=3"])
    assert distributed_notes(acc, ucd, Dist(0, 1, 0, cpu)) == [
        "ucdseg: warning: train.accumulate=3: UCD contrasts each pixel with the pixels of its micro-batch "
        "(8 images) only, not with the whole batch"]
    assert "(4 images per process)" in distributed_notes(acc, ucd, Dist(0, 2, 0, cpu))[0]
    assert distributed_notes(acc, no_ucd, Dist(0, 1, 0, cpu)) == []


def test_trainer_prints_the_warning_once_as_rank_0(make_config, monkeypatch, capsys):
    import ucdseg.engine.runner as run_module

    for rank in (0, 1):  # a Run believing it is rank `rank` of 2 (no collective runs in __init__)
        monkeypatch.setattr(run_module, "setup", lambda device, rank=rank: Dist(rank, 2, rank, torch.device("cpu")))
        Run(make_config("two", "train.batch_size=8", "train.bn=local"), progress=False)
        lines = capsys.readouterr().err.splitlines()
        assert lines == ([] if rank else [
            "ucdseg: warning: 2 processes and method.options.gather=false: UCD contrasts each pixel with its own "
            "process's 4 images only, so the result depends on the number of processes "
            "(method.options.gather=true contrasts with the global batch)"])


# ------------------------------------------------------------------------ method diagnostics
@pytest.fixture
def diagnostic_method():
    """A method whose loss is plain CE and which reports two diagnostics per batch: the number of
    labelled pixels and the fraction of them labelled 0."""

    def ce(ctx: LossContext):
        labels = ctx.labels
        valid = labels != 255
        ctx.diagnostics.update(labelled_pixels=int(valid.sum()),
                               background_share=float((labels == 0).sum() / valid.sum()))
        return torch.nn.functional.cross_entropy(ctx.out.logits, labels, ignore_index=255)

    method = register(Method("test-diagnostics", "CE with diagnostics", {"ce": (ce, 1.0)}, {"ce": (ce, 1.0)}))
    recorded: list[dict] = []
    original = Method.losses

    def losses(self, ctx, weights):
        out = original(self, ctx, weights)
        if self is method:
            recorded.append(dict(ctx.diagnostics))
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Method, "losses", losses)
        yield recorded
    unregister("test-diagnostics")


def test_method_diagnostics_are_logged_like_loss_terms(make_config, tiny_model, diagnostic_method):
    cfg = make_config("diag", "method.name=test-diagnostics", "train.iterations_next=3")
    run(cfg, progress=False)
    logged = scalars(cfg.run_dir)
    recorded = diagnostic_method  # what the method put in ctx.diagnostics, iteration by iteration (2 + 3)
    assert len(recorded) == 5
    for step, batches in ((0, recorded[:2]), (1, recorded[2:])):
        assert logged[f"step{step}/labelled_pixels"] == [b["labelled_pixels"] for b in batches]
        assert logged[f"step{step}/background_share"] == pytest.approx([b["background_share"] for b in batches])
        assert len(logged[f"step{step}/ce"]) == len(batches)
    assert 0 < recorded[0]["background_share"] < 1 and recorded[0]["labelled_pixels"] > 0


# ---------------------------------------------------------------- run directories of old versions
def test_a_key_missing_from_an_old_config_counts_as_its_default(make_config, tiny_model):
    cfg = make_config("old")
    saved = to_dict(cfg)
    del saved["train"]["bn"], saved["eval"]["images"], saved["eval"]["unseen"]  # written before they existed
    assert config_differences(saved, to_dict(cfg)) == []
    assert config_differences(saved, to_dict(make_config("old", "eval.unseen=background"))) == ["eval.unseen"]
    # a run directory whose config.yaml predates the keys continues
    import yaml

    (cfg.run_dir / "checkpoints").mkdir(parents=True)
    (cfg.run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    (cfg.run_dir / "checkpoints" / "step0-last.pt").write_bytes(b"")  # something was trained: the config counts
    Run(cfg, progress=False)  # raises "started with a different config" if the keys counted
    changed = make_config("old", "train.bn=frozen")
    with pytest.raises(ValueError, match=r"differing keys: train\.bn\)"):
        Run(changed, progress=False)


# ----------------------------------------------------------------------- gradient accumulation
# N micro-batches of B/N images, each loss divided by N, give the update of one batch of B when
# nothing couples the images of a batch (train.bn=frozen) and every loss term divides by the same
# count in every micro-batch (all pixels, void included: ddp_exact.py explains why, the argument
# is the one for DDP's gradient average). PLOP (no UCD: its contrast set is the micro-batch) with an
# all-pixel CE at step 0 is such a method.
def _weights(cfg, step):
    return torch.load(cfg.run_dir / "checkpoints" / f"step{step}.pt", weights_only=True)["model"]


def _max_difference(a, b, step, buffers=True) -> float:
    wa, wb = _weights(a, step), _weights(b, step)
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa
               if wa[k].is_floating_point() and (buffers or "running_" not in k))


@pytest.fixture
def exact_plop():
    from ddp_exact import registered

    with registered("plop") as (name,):
        yield name


def test_accumulated_micro_batches_give_the_full_batch_update(make_config, tiny_model, exact_plop):
    method = exact_plop
    common = (f"method.name={method}", "train.batch_size=8", "train.iterations_next=3")
    full = make_config("full", *common, "train.bn=frozen")
    results = {n: run(c, progress=False) for n, c in (
        ("full", full), ("acc2", make_config("acc2", *common, "train.bn=frozen", "train.accumulate=2")),
        ("acc4", make_config("acc4", *common, "train.bn=frozen", "train.accumulate=4")))}
    for name in ("acc2", "acc4"):
        cfg = make_config(name, *common, "train.bn=frozen", f"train.accumulate={name[-1]}")
        for step in (0, 1):
            assert _max_difference(full, cfg, step) < 1e-5, (name, step)
        for a, b in zip(results[name]["steps"], results["full"]["steps"]):
            assert a["accumulate"] == int(name[-1]) and b["accumulate"] == 1
            assert a["per_class_iou"] == pytest.approx(b["per_class_iou"], abs=1e-5)
        logged, want = scalars(cfg.run_dir), scalars(full.run_dir)
        for tag in ("step0/loss", "step0/ce", "step1/loss", "step1/ce", "step1/pod"):
            assert logged[tag] == pytest.approx(want[tag], rel=1e-5), tag
    w0, w1 = _weights(full, 0), _weights(full, 1)
    assert max(float((w1[k] - w0[k]).abs().max()) for k in w0 if w0[k].is_floating_point()) > 1e-3  # it trained
    # with batch statistics (train.bn=local) the micro-batches are normalised over 4 images, not 8
    local = make_config("local", *common, "train.bn=local")
    local2 = make_config("local2", *common, "train.bn=local", "train.accumulate=2")
    run(local, progress=False)
    run(local2, progress=False)
    assert _max_difference(local, local2, 0, buffers=False) > 1e-3


def test_accumulate_must_split_the_batch_evenly(make_config, tiny_model):
    with pytest.raises(ValueError, match=r"train\.batch_size=4 does not split into 1 process\(es\) x "
                                         r"train\.accumulate=3 equal micro-batches"):
        run(make_config("bad", "train.accumulate=3"), progress=False)
    with pytest.raises(ConfigError, match="'train.accumulate' is 0; expected an integer >= 1"):
        make_config("bad", "train.accumulate=0")
