"""The built-in methods, each a composition of the loss terms below.

Default weights follow the MiB paper's baselines (LwF, LwF-MC, ILT, MiB) and UCD (docs/protocol.md §3):
MiB+UCD = UNCE + 10 UNKD + 0.01 L_UCD.

Normalisation over void: every release (MiB, PLOP, UCD) computes its classification loss with
``reduction="none"`` and then ``.mean()``, i.e. it averages over **all** pixels of the batch,
void pixels counting as 0. The classification terms below do the same (docs/methods.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import losses
from ..losses import plop
from .method import LossContext, Method, Option
from .registry import register


def cross_entropy(ctx: LossContext):
    """CE averaged over all pixels, void (255) counting as 0, as ``CrossEntropyLoss(reduction='none')
    ... .mean()`` in MiB's, PLOP's and UCD's trainers."""
    return F.cross_entropy(ctx.out.logits, ctx.labels, ignore_index=255, reduction="none").mean()


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


UCD_OPTIONS = {
    "temperature": Option(0.07, "UCD's softmax temperature tau", positive=True),
    "formulation": Option("reference", "reference: the release's loss; supcon: the paper's Eq. 5-6 "
                          "(docs/methods.md)", choices=("reference", "supcon")),
    "gather": Option(False, "under DDP, contrast against the global batch (docs/distributed.md)"),
}


def ucd(ctx: LossContext):
    """UCD on the step's training labels, read *before* any target hook (docs/protocol.md §3 "Totals")."""
    # ``gather``: contrast against the global batch under DDP
    loss = losses.gathered_contrastive_distillation if ctx.options["gather"] else losses.contrastive_distillation
    log_ucd_inputs(ctx)
    return loss(
        ctx.out.features,
        ctx.old.features,
        ctx.old.low_logits,
        ctx.step_labels,
        temperature=ctx.options["temperature"],
        formulation=ctx.options["formulation"],
    )


@torch.no_grad()
def log_ucd_inputs(ctx: LossContext) -> None:
    """Record in ``ctx.diagnostics`` what this process's UCD term sees (``ucd_*`` floats)."""
    inputs = losses.prepare_contrastive_inputs(
        ctx.out.features.detach(), ctx.old.features, ctx.old.low_logits, ctx.step_labels
    )
    stats = losses.contrastive_input_stats(inputs)
    ctx.diagnostics.update({f"ucd_{key}": value for key, value in stats.items()})


POD_OPTIONS = {
    "pod_factor": Option(plop.PLOP_POD_FACTOR, "Local POD weight of every level but the last (PLOP's "
                         "--pod_factor; its ADE scripts use 0.001)", positive=True),
    "pod_last_factor": Option(plop.PLOP_LAST_POD_FACTOR, "Local POD weight of the last level, the logits "
                              "(PLOP's switch.after.factor; its ADE scripts use 0.00001)", positive=True),
}


def plop_ce(ctx: LossContext):
    """PLOP's CE on the pseudo-labels, each image weighted by its share of confident pixels."""
    stats: plop.PseudoLabelStats = ctx.batch
    return plop.adaptive_cross_entropy(ctx.out.logits, ctx.labels, stats.confident_fraction)


def local_pod(ctx: LossContext):
    return plop.local_pod(plop.pod_levels(ctx.out), plop.pod_levels(ctx.old), ctx.num_old, ctx.num_new,
                          factor=ctx.options["pod_factor"], last_factor=ctx.options["pod_last_factor"])


@dataclass(frozen=True)
class PlopStepState:
    """What PLOP's pass before a step computes: one entropy threshold per old class."""

    thresholds: torch.Tensor


@torch.no_grad()
def plop_thresholds(old_model, loader, device, num_old: int, num_new: int, progress: bool = True) -> PlopStepState:
    """PLOP's per-class entropy thresholds: one pass of the old model over the step's images."""
    acc = plop.EntropyThresholds(num_old, num_old + num_new)
    for images, labels in tqdm(loader, desc="PLOP thresholds", leave=False, disable=not progress):
        acc.update(old_model(images.to(device)).logits.float(), labels.to(device))
    acc.all_reduce()
    return PlopStepState(acc.thresholds())


def plop_pseudo_labels(ctx: LossContext) -> plop.PseudoLabelStats:
    """Background pixels take the old model's class where its entropy is below the threshold.

    Rebinds ``ctx.labels`` to a new tensor; ``ctx.step_labels`` keeps the step's labels for UCD.
    Returns the batch's statistics (``ctx.batch``: the share of confident pixels per image).
    """
    state: PlopStepState = ctx.state
    ctx.labels, stats = plop.entropy_pseudo_labels(ctx.labels, ctx.old.logits, state.thresholds)
    return stats


CE = {"ce": (cross_entropy, 1.0)}

register(Method("ft", "fine-tuning: cross-entropy on the current step's labels only", CE, CE))
register(
    Method(
        "lwf",
        "LwF: cross-entropy + knowledge distillation of the old logits",
        {"ce": (cross_entropy, 1.0), "kd": (kd, 100.0)},
        CE,
    )
)
register(
    Method(
        "lwf-mc",
        "LwF-MC (MiB's --method LWF-MC): BCE on the labels + 10 BCE of the old channels against the old sigmoids",
        {"bce": (label_bce, 1.0), "icarl": (old_sigmoid_bce, 10.0)},
        {"bce": (label_bce, 1.0)},
        first_step="bce",
    )
)
register(
    Method(
        "ilt",
        "ILT: cross-entropy + KD of the old logits + MSE of the encoder features",
        {"ce": (cross_entropy, 1.0), "kd": (kd, 100.0), "de": (encoder_mse, 100.0)},
        CE,
    )
)
register(
    Method(
        "mib",
        "MiB: unbiased cross-entropy + unbiased knowledge distillation, MiB classifier init",
        {"unce": (unbiased_ce, 1.0), "unkd": (unbiased_kd, 10.0)},
        CE,
        classifier_init="mib",
    )
)
register(
    Method(
        "mib+ucd",
        "MiB + UCD uncertainty-aware contrastive distillation of the pre-logits features",
        {"unce": (unbiased_ce, 1.0), "unkd": (unbiased_kd, 10.0), "ucd": (ucd, 0.01)},
        CE,
        classifier_init="mib",
        options=UCD_OPTIONS,
        base="mib",
    )
)
register(
    Method(
        "joint",
        "joint training: every class in one step on all images (upper bound)",
        CE,
        CE,
        joint=True,
    )
)

for name, extra, options, base, description in (
    ("plop", {}, {}, None, "PLOP: entropy pseudo-labels, adaptive cross-entropy and local POD distillation"),
    ("plop+ucd", {"ucd": (ucd, 0.01)}, UCD_OPTIONS, "plop",
     "PLOP + UCD contrastive distillation on the step's labels (PLOP's pseudo-labels feed its CE only)"),
):
    register(
        Method(
            name,
            description,
            {"ce": (plop_ce, 1.0), "pod": (local_pod, 1.0), **extra},
            CE,
            classifier_init="mib",
            before_step=plop_thresholds,
            targets=plop_pseudo_labels,
            options={**POD_OPTIONS, **options},
            base=base,
        )
    )
