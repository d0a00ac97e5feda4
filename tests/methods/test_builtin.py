"""The registered methods: each trains end to end, and each total loss is the documented sum.

The compositions are checked against the loss functions of :mod:`ucdseg.losses` called by hand
with the weights of the papers (docs/protocol.md §3), on a hand-made ``SegOutput``-like namedtuple.
"""

from __future__ import annotations

import math
from collections import namedtuple

import pytest
import torch

from ucdseg import cli, losses
from ucdseg.methods.builtin import PlopStepState
from ucdseg.engine import run
from ucdseg.losses import plop
from ucdseg.methods import LossContext, Method, get_method, list_methods

# step >= 1 loss terms of every method, as documented (docs/protocol.md §3 and the MiB / PLOP papers)
TERMS = {
    "ft": {"ce"},
    "lwf": {"ce", "kd"},
    "lwf-mc": {"bce", "icarl"},
    "ilt": {"ce", "kd", "de"},
    "mib": {"unce", "unkd"},
    "mib+ucd": {"unce", "unkd", "ucd"},
    "plop": {"ce", "pod"},
    "plop+ucd": {"ce", "pod", "ucd"},
    "joint": {"ce"},
}
# the methods of issues 21-22 (their compositions are tested in test_added.py)
ADDED_TERMS = {
    "ewc": {"ce"}, "pi": {"ce"}, "rw": {"ce"}, "mib+sdr": {"unce", "unkd", "pm", "fc", "sep", "fs"},
    "ssul": {"bce"}, "ssul-m": {"bce"},
    "dkd": {"mbce", "kd", "dkd_pos", "dkd_neg", "ac"}, "dkd-m": {"mbce", "kd", "dkd_pos", "dkd_neg", "ac"},
}
ALL_TERMS = {**TERMS, **ADDED_TERMS}
NAMES = ("background", "T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
         "bag", "ankle boot")
Out = namedtuple("Out", "logits low_logits features stages pod_stages")
# MiB's LwF-MC trains step 0 with BCE too, SSUL with its BCE, DKD with its BCE and auxiliary loss; every
# other method with CE
FIRST_STEP = {"lwf-mc": {"bce"}, "ssul": {"bce"}, "ssul-m": {"bce"}, "dkd": {"mbce", "ac"}, "dkd-m": {"mbce", "ac"}}
#: which methods may share a step 0: the same name means the same step-0 computation
# (a joint run trains its only step on every class: its step 0 is its own)
SHARED_STEP0 = {"lwf-mc": "bce", "mib+sdr": "sdr", "ewc": "ewc", "pi": "pi", "rw": "rw", "ssul": "ssul", "ssul-m": "ssul",
                "dkd": "dkd", "dkd-m": "dkd", "joint": "joint"}

#: The methods' option defaults, as the papers give them (UCD: tau 0.07, the release's loss; PLOP's
#: VOC POD factors 0.01 / 0.0005): written here, not read from the code under test.
DEFAULT_OPTIONS = {"temperature": 0.07, "formulation": "reference", "gather": False, "void": "background",
                   "pod_factor": 0.01, "pod_last_factor": 0.0005}


def finite_or_none(value) -> bool:
    return value is None or (math.isfinite(value) and 0 <= value <= 1)


def naive_mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


@pytest.fixture(scope="module")
def trained(config_factory, tiny_engine, tmp_path_factory):
    """``trained(method)`` -> (config, results, per-iteration log): one tiny 8-2 run per method, cached."""
    out = tmp_path_factory.mktemp("methods")
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            log: list[tuple[int, dict, object]] = []
            original = Method.losses

            def losses_spy(self, ctx, weights):
                terms = original(self, ctx, weights)
                log.append((ctx.step, {k: v.item() for k, v in terms.items()}, getattr(ctx.state, "thresholds", None)))
                return terms

            memory = ["data.memory.size=6"] if name.endswith("-m") else []  # the tiny benchmark's step 0: 55 images
            cfg = config_factory(out, name, f"method.name={name}", "eval.num_images=0", *memory)
            with tiny_engine(), pytest.MonkeyPatch.context() as mp:
                mp.setattr(Method, "losses", losses_spy)
                cache[name] = (cfg, run(cfg, progress=False), log)
        return cache[name]

    return get


# ------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("name", sorted(ALL_TERMS))
def test_method_trains_two_steps(trained, name):
    cfg, results, log = trained(name)
    joint = name == "joint"
    assert results["method"] == name
    assert [s["step"] for s in results["steps"]] == ([0] if joint else [0, 1])
    for record in results["steps"]:
        assert all(finite_or_none(v) for v in record["per_class_iou"].values())
        assert all(finite_or_none(v) for groups in record["miou"].values() for v in groups.values())
        assert finite_or_none(record["pixel_accuracy"]) and record["miou"]["with_background"]["all"] is not None
    # every iteration computed the method's terms, all finite
    assert [step for step, _, _ in log] == ([0, 0] if joint else [0, 0, 1, 1])
    for step, terms, thresholds in log:
        assert set(terms) == (FIRST_STEP.get(name, {"ce"}) if step == 0 else ALL_TERMS[name])
        assert all(math.isfinite(v) for v in terms.values()), terms
        if step == 1 and name.startswith("plop"):  # PLOP's before_step pass produced one threshold per old class
            assert thresholds.shape == (9,) and torch.isfinite(thresholds).all() and (thresholds > 0).all()
        else:
            assert thresholds is None
    steps = ["step0.pt"] if joint else ["step0.pt", "step1.pt"]
    assert sorted(p.name for p in (cfg.run_dir / "checkpoints").iterdir()) == steps


def test_joint_is_one_step_scored_against_the_task(trained):
    cfg, results, _ = trained("joint")
    ckpt = torch.load(cfg.run_dir / "checkpoints" / "step0.pt", weights_only=True)
    assert ckpt["classes_per_step"] == [11]
    assert results["task"]["steps"] == [list(range(9)), [9, 10]]  # the benchmark's task, not the joint one
    (record,) = results["steps"]
    assert record["classes"] == list(range(11)) and list(record["per_class_iou"]) == list(NAMES)
    ious = list(record["per_class_iou"].values())
    expected = {
        "with_background": {"old": naive_mean(ious[:9]), "new": naive_mean(ious[9:]), "all": naive_mean(ious)},
        "without_background": {"old": naive_mean(ious[1:9]), "new": naive_mean(ious[9:]),
                               "all": naive_mean(ious[1:])},
    }
    for conv, groups in expected.items():
        for group, value in groups.items():
            assert record["miou"][conv][group] == pytest.approx(value, abs=1e-12), (conv, group)
    assert record["miou"]["without_background"]["new"] is not None or all(v is None for v in ious[9:])


# -------------------------------------------------------------------------------- registry
def test_registry_and_methods_command(capsys):
    assert {m.name for m in list_methods()} == set(ALL_TERMS)
    for method in list_methods():
        assert set(method.default_weights) == ALL_TERMS[method.name]
        assert set(method.first_step_terms) == FIRST_STEP.get(method.name, {"ce"})
    # runs share a step 0 exactly when it computes the same thing
    for a in list_methods():
        for b in list_methods():
            same = SHARED_STEP0.get(a.name, "ce") == SHARED_STEP0.get(b.name, "ce")
            assert (a.first_step == b.first_step) == same, (a.name, b.name)
    assert get_method("lwf-mc").first_step == "bce" and get_method("plop+ucd").first_step == "ce"
    assert get_method("MiB+UCD").name == "mib+ucd"
    with pytest.raises(KeyError, match=r"unknown method 'mib-ucd': expected one of .*, mib\+sdr, mib\+ucd, pi, "):
        get_method("mib-ucd")

    assert cli.main(["methods"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith(" ")]  # not options
    assert sorted(line.split()[0] for line in lines) == sorted(ALL_TERMS)
    by_name = {line.split()[0]: line for line in lines}
    assert by_name["mib+ucd"].endswith("[unce=1, unkd=10, ucd=0.01]")
    assert by_name["lwf"].endswith("[ce=1, kd=100]") and by_name["ilt"].endswith("[ce=1, kd=100, de=100]")
    assert by_name["lwf-mc"].endswith("[bce=1, icarl=10]")


def test_weights_override_and_unknown_term(make_config):
    method = get_method("mib+ucd")
    assert method.weights() == {"unce": 1.0, "unkd": 10.0, "ucd": 0.01}
    assert method.weights({"ucd": 0.5, "unkd": 2}) == {"unce": 1.0, "unkd": 2.0, "ucd": 0.5}
    assert method.default_weights == {"unce": 1.0, "unkd": 10.0, "ucd": 0.01}  # defaults untouched
    with pytest.raises(ValueError, match=r"method 'mib\+ucd' has no loss term 'kd'; its terms are \['ucd', 'unce', 'unkd'\]"):
        method.weights({"kd": 1.0})
    with pytest.raises(ValueError, match="has no loss term 'nope'"):  # through the run config
        run(make_config("bad-weights", "method.weights.nope=1"), progress=False)


# ------------------------------------------------------------------------ loss compositions
def hand_made_batch(seed: int = 0):
    """A step-1 batch: 3 old classes (background + 2), 2 new ones, 8 x 8 labels, 4 x 4 features."""
    g = torch.Generator().manual_seed(seed)

    def out(classes: int) -> Out:
        low = torch.randn(2, classes, 4, 4, generator=g) * 2
        pre = [torch.randn(2, c, s, s, generator=g) for c, s in ((4, 8), (4, 4), (6, 4), (6, 4))]
        stages = [p.clamp(min=0) for p in pre]  # activated outputs; POD reads the pre-activations
        return Out(torch.randn(2, classes, 8, 8, generator=g) * 2, low, torch.randn(2, 6, 4, 4, generator=g),
                   stages, pre)

    new, old = out(5), out(3)
    labels = torch.tensor([0, 0, 0, 3, 4, 255])[torch.randint(0, 6, (2, 8, 8), generator=g)]
    return new, old, labels


def naive_ce(logits, labels):
    """CE summed over non-void pixels, divided by ALL pixels (MiB's, PLOP's, UCD's reduction)."""
    logp = torch.log_softmax(logits, 1)
    picked = [-logp[b, labels[b, i, j], i, j] for b in range(labels.shape[0]) for i in range(labels.shape[1])
              for j in range(labels.shape[2]) if labels[b, i, j] != 255]
    return torch.stack(picked).sum() / labels.numel()


def naive_bce(z, t):
    return -(t * torch.log(torch.sigmoid(z)) + (1 - t) * torch.log(1 - torch.sigmoid(z)))


def naive_lwf_mc(logits, old_logits, labels, first_step=False):
    """MiB's LwF-MC by loops: BCE on the one-hot labels (void: 0) + 10 * sum_c<C_old BCE(z_c, sigmoid(old_c))."""
    b_, c_all, h, w = logits.shape
    c_old = old_logits.shape[1]
    label_term, distill = 0.0, 0.0
    for b in range(b_):
        for i in range(h):
            for j in range(w):
                y = int(labels[b, i, j])
                if y != 255:
                    for c in range(c_all):
                        label_term = label_term + naive_bce(logits[b, c, i, j], float(c == y))
                for c in range(c_old):
                    distill = distill + naive_bce(logits[b, c, i, j], torch.sigmoid(old_logits[b, c, i, j]))
    pixels = b_ * h * w
    return label_term / pixels if first_step else label_term / pixels + 10 * distill / pixels


def expected_total(name: str, new: Out, old: Out, labels: torch.Tensor, options: dict,
                   thresholds: torch.Tensor) -> torch.Tensor:
    """The documented total loss of ``name`` at a step >= 1, from ucdseg.losses called by hand."""
    num_old, num_new = 3, 2
    ce = naive_ce(new.logits, labels)
    kd = losses.knowledge_distillation(new.logits, old.logits)
    if name in ("ft", "joint"):
        return ce
    if name == "lwf":
        return ce + 100 * kd
    if name == "lwf-mc":
        return naive_lwf_mc(new.logits, old.logits, labels)
    if name == "ilt":
        return ce + 100 * kd + 100 * losses.feature_distillation(new.stages[-1], old.stages[-1])

    def ucd(y):
        return losses.contrastive_distillation(new.features, old.features, old.low_logits, y,
                                               temperature=options["temperature"],
                                               formulation=options["formulation"], void=options["void"])

    if name.startswith("mib"):
        unce = losses.unbiased_cross_entropy(new.logits, labels, num_old, reduction="sum") / labels.numel()
        total = unce + 10 * losses.unbiased_kd(new.logits, old.logits)
        return total + 0.01 * ucd(labels) if name == "mib+ucd" else total
    pseudo, stats = losses.entropy_pseudo_labels(labels, old.logits, thresholds)
    levels = [*new.pod_stages, new.features, new.low_logits]
    old_levels = [*old.pod_stages, old.features, old.low_logits]
    total = plop.adaptive_cross_entropy(new.logits, pseudo, stats.confident_fraction)
    total = total + losses.local_pod(levels, old_levels, num_old, num_new, factor=options["pod_factor"],
                                     last_factor=options["pod_last_factor"])
    return total + 0.01 * ucd(labels) if name == "plop+ucd" else total  # UCD: the labels before pseudo-labelling


@pytest.mark.parametrize("name", sorted(TERMS))
def test_total_loss_is_the_weighted_sum_of_its_terms(name):
    new, old, labels = hand_made_batch()
    options = {"temperature": 0.2, "formulation": "supcon", "gather": False, "void": "ignore", "pod_factor": 0.001,
               "pod_last_factor": 1e-5}
    thresholds = torch.tensor([0.3, 0.6, 0.9])
    method = get_method(name)
    ctx = LossContext(1, new, old, labels.clone(), num_old=3, num_new=2, options=options,
                      state=PlopStepState(thresholds))
    terms = method.losses(ctx, method.weights())
    assert set(terms) == TERMS[name]
    total = sum(terms.values())
    expected = expected_total(name, new, old, labels, options, thresholds)
    assert total.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    if "ucd" in terms:
        assert terms["ucd"].item() != 0  # the case exercises the contrastive term
    # step 0: plain cross-entropy for every method but LwF-MC (BCE on the labels, as MiB)
    first = method.losses(LossContext(0, new, None, labels.clone(), 0, 5, options=options), method.weights())
    if name == "lwf-mc":
        expected0 = naive_lwf_mc(new.logits, old.logits, labels, first_step=True)
        assert list(first) == ["bce"] and first["bce"].item() == pytest.approx(expected0.item(), rel=1e-5)
    else:
        assert list(first) == ["ce"] and first["ce"].item() == pytest.approx(naive_ce(new.logits, labels).item(), rel=1e-5)


def test_zero_weight_skips_a_term():
    new, old, labels = hand_made_batch(1)
    method = get_method("mib+ucd")
    ctx = LossContext(1, new, old, labels, num_old=3, num_new=2, options=dict(DEFAULT_OPTIONS))
    terms = method.losses(ctx, method.weights({"ucd": 0, "unkd": 1}))
    assert set(terms) == {"unce", "unkd"}
    assert terms["unkd"].item() == pytest.approx(losses.unbiased_kd(new.logits, old.logits).item(), rel=1e-6)


def test_plop_target_hook_pseudo_labels_confident_background():
    # one image, one row of 7 pixels; old model: background + classes 1, 2; new class 3
    old_logits = torch.tensor([[0., 8, 0], [0, 0, 0], [8, 0, 0], [0, 8, 0], [0, 3, 0], [0, 0, 3], [0, 8, 0]])
    old = Out(old_logits.T.reshape(1, 3, 1, 7), None, None, None, None)
    labels = torch.tensor([[[0, 0, 0, 3, 0, 0, 255]]])
    # normalised entropies: ~0.005 (pixels 0, 2, 3, 6), 1.0 (pixel 1), ~0.334 (pixels 4, 5)
    thresholds = torch.tensor([0.5, 0.5, 0.2])
    ctx = LossContext(1, None, old, labels, num_old=3, num_new=1, state=PlopStepState(thresholds))
    ctx.batch = get_method("plop").targets(ctx)
    # 0: confident class 1 -> 1; 1: uncertain -> 255; 2: confident background -> 0; 3: new class kept;
    # 4: class 1 at entropy 0.33 < 0.5 -> 1; 5: class 2 at 0.33 >= 0.2 -> 255; 6: void kept
    assert ctx.labels.tolist() == [[[1, 255, 0, 3, 1, 255, 255]]]
    assert labels.tolist() == [[[0, 0, 0, 3, 0, 0, 255]]]  # the loader's tensor is not modified
    assert ctx.step_labels is labels  # and stays available to UCD
    assert ctx.batch.confident_fraction.tolist() == pytest.approx([3 / 5])  # of 5 background pixels


# ------------------------------------------------------------------ PLOP + UCD wiring (docs/protocol.md §3)
def plop_ucd_batch(seed: int = 0):
    """B=4, 16 old classes (background included) + 1 new: mostly background labels, a few new-class cells."""
    g = torch.Generator().manual_seed(seed)
    b, c_old, c_all, h, w, s = 4, 16, 17, 4, 4, 4

    def out(classes: int) -> Out:
        low = torch.randn(b, classes, h, w, generator=g) * 3
        pre = [torch.randn(b, 3, h, w, generator=g) for _ in range(4)]
        return Out(low.repeat_interleave(s, 2).repeat_interleave(s, 3), low, torch.randn(b, 8, h, w, generator=g),
                   [p.clamp(min=0) for p in pre], pre)

    new, old = out(c_all), out(c_old)
    cells = torch.where(torch.rand(b, h, w, generator=g) < 0.25, 16, 0)
    labels = cells.repeat_interleave(s, 1).repeat_interleave(s, 2)
    return new, old, labels


def test_plop_ucd_contrasts_the_step_labels_with_old_model_features():
    new, old, labels = plop_ucd_batch()
    options = dict(DEFAULT_OPTIONS)
    method = get_method("plop+ucd")
    ctx = LossContext(1, new, old, labels.clone(), num_old=16, num_new=1, options=options,
                      state=PlopStepState(torch.ones(16)))  # every background pixel is pseudo-labelled
    terms = method.losses(ctx, method.weights())
    assert bool((ctx.labels != labels).any())  # PLOP's CE saw pseudo-labels ...
    assert torch.equal(ctx.step_labels, labels)  # ... UCD the step's labels
    expected = losses.contrastive_distillation(new.features, old.features, old.low_logits, labels)
    assert terms["ucd"].item() == pytest.approx(0.01 * expected.item(), rel=1e-6)
    # what the UCD term saw, as logged: old-model elements and uncertainty weights other than 1
    seen = ctx.diagnostics
    cells = labels[:, ::4, ::4]  # labels are constant on each 4 x 4 feature cell
    old_kept = ((cells == 0) & (old.low_logits.argmax(1) != 0)).sum().item()  # background the old model calls old
    assert seen["ucd_old_elements"] == old_kept > 0
    assert seen["ucd_anchors"] == old_kept + (cells == 16).sum().item()
    assert seen["ucd_contrast"] == seen["ucd_anchors"] + old_kept
    assert 0 < seen["ucd_weighted_pair_share"] < 1  # exact value: tests/losses/test_contrastive_stats.py
    # the pseudo-labels would have left UCD with GT-GT pairs only (the defect this wiring avoids)
    pseudo = losses.contrastive_input_stats(
        losses.prepare_contrastive_inputs(new.features, old.features, old.low_logits, ctx.labels))
    assert pseudo["old_elements"] == 0 and pseudo["weighted_pair_share"] == 0


def test_mib_ucd_logs_what_the_ucd_term_sees():
    new, old, labels = plop_ucd_batch(1)
    method = get_method("mib+ucd")
    ctx = LossContext(1, new, old, labels, num_old=16, num_new=1, options=dict(DEFAULT_OPTIONS))
    method.losses(ctx, method.weights())
    assert set(ctx.diagnostics) == {"ucd_anchors", "ucd_contrast", "ucd_old_elements",
                                             "ucd_positive_pairs", "ucd_weighted_pair_share"}
    assert all(isinstance(v, float) for v in ctx.diagnostics.values())
    assert ctx.diagnostics["ucd_old_elements"] > 0


# -------------------------------------------------------------- normalisation over void pixels
@pytest.mark.parametrize("name,term", [("ft", "ce"), ("lwf", "ce"), ("ilt", "ce"), ("mib", "unce"),
                                       ("lwf-mc", "bce"), ("plop", "ce"), ("joint", "ce")])
def test_classification_terms_average_over_all_pixels_void_included(name, term):
    """MiB, PLOP and UCD divide their CE-type loss by every pixel of the batch, void ones included."""
    new, old, labels = hand_made_batch(2)
    labels[1] = 255  # the second image is entirely void: it adds pixels to the mean and no loss
    method = get_method(name)
    state = PlopStepState(torch.tensor([0.3, 0.6, 0.9]))

    def value(n: int, step: int):
        first = Out(*(t[:n] if torch.is_tensor(t) else [x[:n] for x in t] for t in new))
        previous = Out(*(t[:n] if torch.is_tensor(t) else [x[:n] for x in t] for t in old))
        ctx = LossContext(step, first, previous if step else None, labels[:n].clone(), 3, 2,
                          options=dict(DEFAULT_OPTIONS), state=state)
        terms = method.losses(ctx, method.weights())
        return terms[term if step else next(iter(method.first_step_terms))].item()

    for step in (0, 1) if name != "joint" else (0,):
        assert value(2, step) == pytest.approx(value(1, step) / 2, rel=1e-6)
