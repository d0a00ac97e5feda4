"""The built-in methods, each a composition of the loss terms below.

Default weights follow the MiB paper's baselines (LwF, LwF-MC, ILT, MiB) and UCD (SPEC §3):
MiB+UCD = UNCE + 10 UNKD + 0.01 L_UCD.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import losses
from ..losses import plop
from .base import LossContext, Method, register


def cross_entropy(ctx: LossContext):
    return F.cross_entropy(ctx.out.logits, ctx.labels, ignore_index=255)


def unbiased_ce(ctx: LossContext):
    return losses.unbiased_cross_entropy(ctx.out.logits, ctx.labels, ctx.num_old)


def kd(ctx: LossContext):
    return losses.knowledge_distillation(ctx.out.logits, ctx.old.logits)


def unbiased_kd(ctx: LossContext):
    return losses.unbiased_kd(ctx.out.logits, ctx.old.logits)


def multiclass_bce(ctx: LossContext):
    return losses.multiclass_bce_distillation(ctx.out.logits, ctx.old.logits, ctx.labels)


def encoder_mse(ctx: LossContext):
    return losses.feature_distillation(ctx.out.stages[-1], ctx.old.stages[-1])


def ucd(ctx: LossContext):
    opts = ctx.options
    gather = opts is not None and opts.ucd_gather  # contrast against the global batch under DDP
    loss = losses.gathered_contrastive_distillation if gather else losses.contrastive_distillation
    return loss(
        ctx.out.features,
        ctx.old.features,
        ctx.old.low_logits,
        ctx.labels,
        temperature=opts.ucd_temperature if opts is not None else 0.07,
        formulation=opts.ucd_formulation if opts is not None else "reference",
    )


def plop_ce(ctx: LossContext):
    return plop.adaptive_cross_entropy(ctx.out.logits, ctx.labels, ctx.batch["confident_fraction"])


def local_pod(ctx: LossContext):
    return plop.local_pod(plop.pod_levels(ctx.out), plop.pod_levels(ctx.old), ctx.num_old, ctx.num_new)


@torch.no_grad()
def plop_thresholds(old_model, loader, device, num_old: int, num_new: int, progress: bool = True) -> dict:
    """PLOP's per-class entropy thresholds: one pass of the old model over the step's images."""
    acc = plop.EntropyThresholds(num_old, num_old + num_new)
    for images, labels in tqdm(loader, desc="PLOP thresholds", leave=False, disable=not progress):
        acc.update(old_model(images.to(device)).logits.float(), labels.to(device))
    acc.all_reduce()
    return {"thresholds": acc.thresholds()}


def plop_pseudo_labels(ctx: LossContext) -> None:
    """Background pixels take the old model's class where its entropy is below the threshold."""
    ctx.labels, stats = plop.entropy_pseudo_labels(ctx.labels, ctx.old.logits, ctx.state["thresholds"])
    ctx.batch["confident_fraction"] = stats.confident_fraction


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
        "LwF-MC: multi-class binary cross-entropy with the old model's sigmoid outputs as targets",
        {"bce": (multiclass_bce, 1.0)},
        CE,
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

for name, extra, description in (
    ("plop", {}, "PLOP: entropy pseudo-labels, adaptive cross-entropy and local POD distillation"),
    ("plop+ucd", {"ucd": (ucd, 0.01)},
     "PLOP + UCD contrastive distillation on PLOP's pseudo-labelled targets"),
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
        )
    )
