"""The built-in methods, each a composition of the loss terms below.

Default weights follow the MiB paper's baselines (LwF, LwF-MC, ILT, MiB) and UCD (docs/protocol.md §3):
MiB+UCD = UNCE + 10 UNKD + 0.01 L_UCD.

Normalisation over void: every release (MiB, PLOP, UCD) computes its classification loss with
``reduction="none"`` and then ``.mean()``, i.e. it averages over **all** pixels of the batch,
void pixels counting as 0. The classification terms below do the same (docs/methods.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import losses  # the loss modules (torch) are imported when a term first runs
from ..losses.defaults import PLOP_LAST_POD_FACTOR, PLOP_POD_FACTOR
from .method import LossContext, Method, Option, RunShape, StepSetup, Term
from .registry import register

if TYPE_CHECKING:
    import torch


def cross_entropy(ctx: LossContext):
    """CE averaged over all pixels, void (255) counting as 0, as ``CrossEntropyLoss(reduction='none')
    ... .mean()`` in MiB's, PLOP's and UCD's trainers."""
    from torch.nn.functional import cross_entropy

    return cross_entropy(ctx.out.logits, ctx.labels, ignore_index=255, reduction="none").mean()


def unbiased_ce(ctx: LossContext):
    """MiB's UNCE averaged over all pixels (void as 0), as MiB's trainer does."""
    return losses.unbiased_cross_entropy(ctx.out.logits, ctx.labels, ctx.num_old, reduction="none").mean()


def kd(ctx: LossContext):
    return losses.knowledge_distillation(ctx.out.logits, ctx.old.logits)


def unbiased_kd(ctx: LossContext):
    return losses.unbiased_kd(ctx.out.logits, ctx.old.logits)


def label_bce(ctx: LossContext):
    return losses.label_bce(ctx.out.logits, ctx.labels)


def old_sigmoid_bce(ctx: LossContext):
    return losses.old_sigmoid_bce(ctx.out.logits, ctx.old.logits)


def encoder_mse(ctx: LossContext):
    return losses.feature_distillation(ctx.out.stages[-1], ctx.old.stages[-1])


def ucd(ctx: LossContext, temperature: float, formulation: str, gather: bool, void: str):
    """UCD on the step's training labels, read *before* any target hook (docs/protocol.md §3 "Totals").
    ``gather``: contrast against the global batch under DDP; ``void``: ``background`` turns void
    cells into 0 as both UCD releases do, ``ignore`` leaves them out."""
    loss = losses.gathered_contrastive_distillation if gather else losses.contrastive_distillation
    seen: dict[str, float] = {}  # what this process's term sees, counted on the inputs it prepared
    value = loss(ctx.out.features, ctx.old.features, ctx.old.low_logits, ctx.step_labels,
                 temperature=temperature, formulation=formulation, void=void, stats=seen)
    ctx.diagnostics.update({f"ucd_{key}": count for key, count in seen.items()})
    return value


def ucd_notes(shape: RunShape, options) -> list[str]:
    """UCD contrasts the pixels of one forward: say so when that is less than the batch."""
    notes = []
    where = " per process" if shape.world_size > 1 else ""
    if shape.accumulate > 1:
        notes.append(f"ucdseg: warning: train.accumulate={shape.accumulate}: UCD contrasts each pixel with the "
                     f"pixels of its micro-batch ({shape.micro_batch} images{where}) only, not with the whole batch")
    if shape.world_size > 1 and not options["gather"]:
        notes.append(f"ucdseg: warning: {shape.world_size} processes and method.options.gather=false: UCD contrasts "
                     f"each pixel with its own process's {shape.micro_batch} images only, so the result depends on the "
                     "number of processes (method.options.gather=true contrasts with the global batch)")
    return notes


UCD_OPTIONS = {
    "temperature": Option(0.07, "UCD's softmax temperature tau", positive=True),
    "formulation": Option("reference", "reference: the release's loss; supcon: the paper's Eq. 5-6 "
                          "(docs/methods.md)", choices=("reference", "supcon")),
    "gather": Option(False, "under DDP, contrast against the global batch (docs/distributed.md)"),
    "void": Option("background", "void (255) cells: background (the releases: labelled 0, they take the old "
                   "model's prediction and enter the loss) or ignore (left out)", choices=("background", "ignore")),
}
#: UCD's term at the paper's weight (MiB+UCD = UNCE + 10 UNKD + 0.01 L_UCD).
UCD = Term(ucd, 0.01, options=UCD_OPTIONS, notes=ucd_notes)


POD_OPTIONS = {
    "pod_factor": Option(PLOP_POD_FACTOR, "Local POD weight of every level but the last (PLOP's "
                         "--pod_factor; its ADE scripts use 0.001)", positive=True),
    "pod_last_factor": Option(PLOP_LAST_POD_FACTOR, "Local POD weight of the last level, the logits "
                              "(PLOP's switch.after.factor; its ADE scripts use 0.00001)", positive=True),
}


def plop_ce(ctx: LossContext):
    """PLOP's CE on the pseudo-labels, each image weighted by its share of confident pixels."""
    stats: losses.plop.PseudoLabelStats = ctx.batch
    return losses.plop.adaptive_cross_entropy(ctx.out.logits, ctx.labels, stats.confident_fraction)


def local_pod(ctx: LossContext, pod_factor: float, pod_last_factor: float):
    plop = losses.plop
    return plop.local_pod(plop.pod_levels(ctx.out), plop.pod_levels(ctx.old), ctx.num_old, ctx.num_new,
                          factor=pod_factor, last_factor=pod_last_factor)


@dataclass(frozen=True)
class PlopStepState:
    """What PLOP's pass before a step computes: one entropy threshold per old class."""

    thresholds: torch.Tensor


def plop_thresholds(setup: StepSetup) -> PlopStepState:
    """PLOP's per-class entropy thresholds: one pass of the old model over the step's images."""
    import torch
    from tqdm import tqdm

    with torch.no_grad():
        acc = losses.plop.EntropyThresholds(setup.num_old, setup.num_old + setup.num_new, device=setup.device)
        for images, labels in tqdm(setup.loader(), desc="PLOP thresholds", leave=False, disable=not setup.progress):
            acc.update(setup.old_model(images.to(setup.device)).logits.float(), labels.to(setup.device))
        acc.all_reduce()
        return PlopStepState(acc.thresholds())


def plop_pseudo_labels(ctx: LossContext) -> losses.plop.PseudoLabelStats:
    """Background pixels take the old model's class where its entropy is below the threshold.

    Rebinds ``ctx.labels`` to a new tensor; ``ctx.step_labels`` keeps the step's labels for UCD.
    Returns the batch's statistics (``ctx.batch``: the share of confident pixels per image).
    """
    state: PlopStepState = ctx.state
    ctx.labels, stats = losses.plop.entropy_pseudo_labels(ctx.labels, ctx.old.logits, state.thresholds)
    return stats


# ------------------------------------------------------------------------------ the terms
CE = Term(cross_entropy, 1.0)
UNCE = Term(unbiased_ce, 1.0)
UNKD = Term(unbiased_kd, 10.0)
KD = Term(kd, 100.0)
LABEL_BCE = Term(label_bce, 1.0)
ICARL = Term(old_sigmoid_bce, 10.0)
ENCODER_MSE = Term(encoder_mse, 100.0)
PLOP_CE = Term(plop_ce, 1.0)
POD = Term(local_pod, 1.0, options=POD_OPTIONS)

# ------------------------------------------------------------------------------ the methods
FT = register(Method("ft", "fine-tuning: cross-entropy on the current step's labels only", {"ce": CE}, {"ce": CE}))
Method.name_first_step(FT, "ce")
LWF = register(FT.extend("lwf", "LwF: cross-entropy + knowledge distillation of the old logits", {"kd": KD},
                         base=None))
LWF_MC = register(Method(
    "lwf-mc", "LwF-MC (MiB's --method LWF-MC): BCE on the labels + 10 BCE of the old channels against the old sigmoids",
    {"bce": LABEL_BCE, "icarl": ICARL}, {"bce": LABEL_BCE}))
Method.name_first_step(LWF_MC, "bce")
ILT = register(LWF.extend("ilt", "ILT: cross-entropy + KD of the old logits + MSE of the encoder features",
                          {"de": ENCODER_MSE}, base=None))
MIB = register(Method("mib", "MiB: unbiased cross-entropy + unbiased knowledge distillation, MiB classifier init",
                      {"unce": UNCE, "unkd": UNKD}, {"ce": CE}, classifier_init="mib"))
MIB_UCD = register(MIB.extend("mib+ucd", "MiB + UCD uncertainty-aware contrastive distillation of the pre-logits "
                              "features", {"ucd": UCD}))
JOINT = register(FT.as_joint("joint", "joint training: every class in one step on all images (upper bound)"))
PLOP = register(Method("plop", "PLOP: entropy pseudo-labels, adaptive cross-entropy and local POD distillation",
                       {"ce": PLOP_CE, "pod": POD}, {"ce": CE}, classifier_init="mib", before_step=plop_thresholds,
                       targets=plop_pseudo_labels))
PLOP_UCD = register(PLOP.extend("plop+ucd", "PLOP + UCD contrastive distillation on the step's labels (PLOP's "
                                "pseudo-labels feed its CE only)", {"ucd": UCD}))
