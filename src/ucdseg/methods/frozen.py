"""SSUL and DKD (docs/methods.md "SSUL" and "DKD"; the releases clovaai/SSUL and cvlab-yonsei/DKD).

Both are DeepLab-v3 methods whose later steps freeze much of the network, train with per-class
sigmoids, and come with an exemplar-memory variant (``ssul-m``, ``dkd-m``: ``data.memory.size``
100 on VOC, 300 on ADE20K). What each owns, beyond its loss terms:

* **SSUL**: per-step conv heads with an *unknown* channel before background (``heads="ssul"``);
  training labels shifted by one with background pixels a saliency map calls salient marked
  unknown (``method.options.unknown=saliency``; ``background`` marks every background pixel, the
  ADE20K rule); at ``t >= 1`` every BatchNorm in eval mode and everything frozen but the new head,
  the unknown head (lr) and the background head (lr x 1e-4); the new head copied from the unknown
  head; old-model pseudo-labels at 0.7; inference: ``p_bg += p_unknown``; memory replacing half of
  each batch, labelled with every seen class.
* **DKD**: foreground-only classifiers with an auxiliary channel (``heads="dkd"``); at ``t >= 1``
  BatchNorm in eval mode and out of the optimiser, the backbone at lr (no weight decay), the head
  and old classifiers at 10 lr (no weight decay), the new classifier at 10 lr; the new classifier
  copied from the auxiliary one; inference: background where no foreground sigmoid exceeds 0.5;
  memory concatenated to the step's images, labelled with the step's classes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import losses, models  # imported when a hook first runs (losses.ssul, models.batchnorms: torch)
from ..losses.defaults import (DKD_POS_WEIGHT, DKD_POS_WEIGHT_STEP0, DKD_PSEUDO_THRESHOLD, DKD_WEIGHTS,
                               SSUL_PSEUDO_THRESHOLD)
from ..models import ModelSpec
from .method import LossContext, MemorySpec, Method, Option, Term
from .registry import register

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["SSUL", "SSUL_M", "DKD", "DKD_M", "bn_params", "freeze_all_batchnorm"]


def bn_params(module: nn.Module) -> set[int]:
    """The ids of the affine parameters of ``module``'s BatchNorm layers."""
    return {id(p) for m in models.batchnorms(module) for p in m.parameters()}


def freeze_all_batchnorm(model: nn.Module, step: int) -> None:
    """Every BatchNorm in eval mode: it normalises with its running statistics and never updates
    them (SSUL network/utils.py:21-30, DKD models/model.py:117-133). Their affine parameters are
    out of the method's parameter groups, hence frozen."""
    for module in models.batchnorms(model):
        module.eval()


def _params(module: nn.Module, without: set[int] = frozenset()) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if id(p) not in without]


# ------------------------------------------------------------------------------------ SSUL
def ssul_labels(labels, options, saliency=None):
    """SSUL's training labels (shift by one; unknown from saliency, or every background pixel)."""
    return losses.ssul.ssul_train_labels(labels, saliency if options["unknown"] == "saliency" else None)


def ssul_needs(options) -> tuple[str, ...]:
    return ("saliency",) if options["unknown"] == "saliency" else ()


def ssul_param_groups(model, step: int, lr: float, weight_decay: float) -> list[dict]:
    """Step 0: the backbone at lr / 10 and the head and classifiers at lr (the release's fixed 0.001
    and 0.01, main.py:262-264). Later steps: the new head and the unknown head at lr, the background
    head at lr x 1e-4, without their BatchNorm parameters; nothing else trains (main.py:241-260)."""
    if step == 0:
        return [{"params": _params(model.backbone), "lr": lr * 0.1, "weight_decay": weight_decay},
                {"params": _params(model.head) + _params(model.classifier), "lr": lr, "weight_decay": weight_decay}]
    frozen_bn = bn_params(model)
    unknown, background, new = model.classifier[0], model.classifier[1], model.classifier[-1]
    return [{"params": _params(new, frozen_bn), "lr": lr, "weight_decay": weight_decay},
            {"params": _params(unknown, frozen_bn), "lr": lr, "weight_decay": weight_decay},
            {"params": _params(background, frozen_bn), "lr": lr * 1e-4, "weight_decay": weight_decay}]


def ssul_confident(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """Model-space ids where SSUL's old model is confident of an old class (its pseudo-label rule
    on background pixels, SSUL utils/memory.py:68-96), else 0."""
    background = logits.new_full(logits.shape[:1] + logits.shape[2:], losses.ssul.SSUL_BACKGROUND).long()
    pseudo = losses.ssul.ssul_pseudo_labels(background, logits, threshold)
    return (pseudo - 1).clamp(min=0)


def ssul_pseudo_targets(ctx: LossContext, pseudo_threshold: float) -> None:
    """At ``t >= 1`` unknown and background pixels take the old model's confident class (main.py:451-466)."""
    ctx.labels = losses.ssul.ssul_pseudo_labels(ctx.labels, ctx.old.logits, pseudo_threshold)


def ssul_predict(logits: torch.Tensor) -> torch.Tensor:
    """SSUL's inference rule: ``p_bg += p_unknown``, then the argmax (:func:`ucdseg.losses.ssul_predict`)."""
    return losses.ssul.ssul_predict(logits)


def ssul_bce(ctx: LossContext):
    return losses.ssul.ssul_bce(ctx.out.logits, ctx.labels)


SSUL_OPTIONS = {
    "unknown": Option("saliency", "what marks the unknown class: saliency (VOC, the release's saliency maps) or "
                      "background (every background pixel: the ADE20K rule)", choices=("saliency", "background")),
    "pseudo_threshold": Option(SSUL_PSEUDO_THRESHOLD, "old-model pseudo-labels at steps >= 1 where "
                               "its sigmoid reaches this (--pseudo_thresh)", positive=True),
}


def _ssul_targets(ctx: LossContext) -> None:
    ssul_pseudo_targets(ctx, ctx.options["pseudo_threshold"])


SSUL_BCE = Term(ssul_bce, 1.0)
SSUL = register(Method(
    "ssul", "SSUL: unknown class from saliency, per-step heads, frozen network, sigmoid BCE with pseudo-labels",
    {"bce": SSUL_BCE}, {"bce": SSUL_BCE}, classifier_init="ssul", targets=_ssul_targets, options=SSUL_OPTIONS,
    model=ModelSpec(heads="ssul", backbone_bn_momentum=0.01), param_groups=ssul_param_groups,
    train_mode=freeze_all_batchnorm, label_transform=ssul_labels, needs=ssul_needs,
    predict=ssul_predict, confident_classes=ssul_confident,
    memory=MemorySpec(mixing="replace_half", labels="seen", pseudo_threshold=SSUL_PSEUDO_THRESHOLD)))
SSUL_M = register(SSUL.extend("ssul-m", "SSUL-M: SSUL with exemplar memory (data.memory.size 100 by default, "
                              "300 on ADE20K), replacing half of each batch", memory_size=100))


# ------------------------------------------------------------------------------------ DKD
def dkd_param_groups(model, step: int, lr: float, weight_decay: float) -> list[dict]:
    """train_voc.py:127-143. Step 0: the backbone at lr, the head and classifiers at 10 lr, weight
    decay everywhere. Later steps (BatchNorm parameters dropped, ``--freeze_bn``): the backbone at
    lr and the head and old classifiers (auxiliary included) at 10 lr, without weight decay; the new
    classifier at 10 lr with weight decay."""
    if step == 0:
        return [{"params": _params(model.backbone), "lr": lr, "weight_decay": weight_decay},
                {"params": _params(model.head), "lr": 10 * lr, "weight_decay": weight_decay},
                {"params": _params(model.classifier), "lr": 10 * lr, "weight_decay": weight_decay}]
    frozen_bn = bn_params(model)
    old = [p for conv in model.classifier[:-1] for p in conv.parameters()]
    return [{"params": _params(model.backbone, frozen_bn), "lr": lr, "weight_decay": 0.0},
            {"params": _params(model.head, frozen_bn), "lr": 10 * lr, "weight_decay": 0.0},
            {"params": old, "lr": 10 * lr, "weight_decay": 0.0},
            {"params": _params(model.classifier[-1]), "lr": 10 * lr, "weight_decay": weight_decay}]


def dkd_predict(logits: torch.Tensor) -> torch.Tensor:
    """DKD's rule on the foreground channels (channel 0 is the auxiliary classifier's)."""
    return losses.dkd.dkd_predict(logits[:, 1:])


def dkd_confident(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """Model-space ids where DKD's old model is confident of a class (DKD utils/memory.py:99-116), else 0."""
    background = logits.new_zeros(logits.shape[:1] + logits.shape[2:]).long()
    return losses.dkd.dkd_pseudo_labels(background, logits[:, 1:], threshold)


def dkd_mbce(ctx: LossContext, pos_weight: float, ignore_void: bool):
    """BCE of the new classes' channels, void counted as negative unless ``ignore_void``."""
    if ctx.old is None:  # step 0: its foreground classes (background has no channel)
        first, count = 0, ctx.num_new - 1
    else:  # the foreground channels after the old ones
        first, count = ctx.num_old - 1, ctx.num_new
    return losses.dkd.dkd_mbce(ctx.out.logits[:, 1:], ctx.labels, range(first, first + count),
                               pos_weight=pos_weight, ignore_void=ignore_void)


def dkd_mbce_step0(ctx: LossContext, pos_weight_step0: float, ignore_void: bool):
    return dkd_mbce(ctx, pos_weight_step0, ignore_void)


def dkd_kd(ctx: LossContext):
    return losses.dkd.dkd_kd(ctx.out.logits[:, 1:], ctx.old.logits[:, 1:], ctx.num_old - 1)


def dkd_pos(ctx: LossContext):
    return losses.dkd.dkd_decomposed_kd(ctx.out.pos_logits, ctx.old.pos_logits)


def dkd_neg(ctx: LossContext):
    return losses.dkd.dkd_decomposed_kd(ctx.out.neg_logits, ctx.old.neg_logits)


def dkd_aux(ctx: LossContext):
    return losses.dkd.dkd_aux_loss(ctx.out.logits[:, :1])


DKD_OPTIONS = {
    "pos_weight": Option(DKD_POS_WEIGHT, "pos_weight of the new classes' BCE at steps >= 1 (VOC 1, "
                         "ADE20K 35: configs/config_*.json)", positive=True),
    "pos_weight_step0": Option(DKD_POS_WEIGHT_STEP0, "pos_weight at step 0 (VOC scripts: 2)",
                               positive=True),
    "ignore_void": Option(False, "leave void pixels out of the new classes' BCE (the release counts them as "
                          "negatives)"),
}
_W = DKD_WEIGHTS
_MBCE_OPTIONS = {k: DKD_OPTIONS[k] for k in ("pos_weight", "ignore_void")}
_MBCE0_OPTIONS = {k: DKD_OPTIONS[k] for k in ("pos_weight_step0", "ignore_void")}
DKD_AUX = Term(dkd_aux, _W["ac"])
DKD = register(Method(
    "dkd", "DKD: decomposed knowledge distillation of positive and negative logits, auxiliary classifier, "
    "frozen BatchNorm",
    {"mbce": Term(dkd_mbce, _W["mbce"], options=_MBCE_OPTIONS), "kd": Term(dkd_kd, _W["kd"]),
     "dkd_pos": Term(dkd_pos, _W["dkd_pos"]), "dkd_neg": Term(dkd_neg, _W["dkd_neg"]), "ac": DKD_AUX},
    {"mbce": Term(dkd_mbce_step0, _W["mbce"], options=_MBCE0_OPTIONS), "ac": DKD_AUX},
    classifier_init="dkd", model=ModelSpec(heads="dkd", backbone_bn_momentum=0.01), param_groups=dkd_param_groups,
    train_mode=freeze_all_batchnorm, predict=dkd_predict, confident_classes=dkd_confident,
    memory=MemorySpec(mixing="concat", labels="current", pseudo_threshold=DKD_PSEUDO_THRESHOLD)))
DKD_M = register(DKD.extend("dkd-m", "DKD-M: DKD with exemplar memory (data.memory.size 100 by default, 300 on "
                            "ADE20K), concatenated to the step's images", memory_size=100))
