"""An example extension of ucdseg: MiB plus a distillation term of our own.

``cosine_distillation`` asks the new model's pre-logits features to keep the direction of the
old model's, pixel by pixel: ``mean over pixels of 1 - cos(f_new, f_old)``. The method
``mib+cos`` adds it to MiB's two terms with weight 0.1. Importing this module registers it;
ucdseg imports it through the entry point of ``pyproject.toml`` (once installed) or through a
config's ``imports: [ucdseg_cosine]`` (on PYTHONPATH).
"""

import torch.nn.functional as F

from ucdseg.losses import unbiased_cross_entropy, unbiased_kd
from ucdseg.methods import LossContext, Method, register

__all__ = ["cosine_distillation", "METHOD"]


def cosine_distillation(ctx: LossContext):
    """Mean over pixels of 1 - cosine similarity between new and old features (B, 256, h, w)."""
    similarity = F.cosine_similarity(ctx.out.features, ctx.old.features.detach(), dim=1)  # (B, h, w)
    return (1 - similarity).mean()


def _unce(ctx: LossContext):
    return unbiased_cross_entropy(ctx.out.logits, ctx.labels, ctx.num_old)


def _unkd(ctx: LossContext):
    return unbiased_kd(ctx.out.logits, ctx.old.logits)


def _ce(ctx: LossContext):
    return F.cross_entropy(ctx.out.logits, ctx.labels, ignore_index=255)


METHOD = register(Method(
    name="mib+cos",
    description="MiB + cosine distillation of the pre-logits features (example extension)",
    terms={"unce": (_unce, 1.0), "unkd": (_unkd, 10.0), "cos": (cosine_distillation, 0.1)},
    first_step_terms={"ce": (_ce, 1.0)},  # step 0: plain cross-entropy, as every method
    classifier_init="mib",
))
