"""An example extension of ucdseg: MiB plus a distillation term of our own.

``cosine_distillation`` asks the new model's pre-logits features to keep the direction of the
old model's, pixel by pixel: ``mean over pixels of 1 - cos(f_new, f_old)``. The method
``mib+cos`` is MiB (its terms, weights, step 0 and classifier init, unchanged) with this term
added at weight 0.1, and ``base="mib"``, so ``ucdseg report`` pairs it with MiB and runs may
share MiB's step 0. Importing this module registers it; ucdseg imports it through the entry
point of ``pyproject.toml`` (once installed) or through a config's ``imports: [ucdseg_cosine]``
(on PYTHONPATH).
"""

import torch.nn.functional as F

from ucdseg.methods import LossContext, Term, get_method, register

__all__ = ["cosine_distillation", "METHOD"]


def cosine_distillation(ctx: LossContext):
    """Mean over pixels of 1 - cosine similarity between new and old features (B, 256, h, w)."""
    similarity = F.cosine_similarity(ctx.out.features, ctx.old.features.detach(), dim=1)  # (B, h, w)
    return (1 - similarity).mean()


METHOD = register(get_method("mib").extend(
    "mib+cos", "MiB + cosine distillation of the pre-logits features (example extension)",
    terms={"cos": Term(cosine_distillation, 0.1)},
))
