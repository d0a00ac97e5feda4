"""MiB+SDR: MiB's unbiased losses plus SDR's latent-space terms on the backbone's output features
(LTTM/SDR, CVPR 2021; docs/methods.md "MiB+SDR").

The prototypes (one running mean of the encoder features per class seen, and its pixel count)
are the method's step state: built at step 0 (plain cross-entropy, SDR's ``--loss_de_prototypes 1``
step-0 script, which only builds them), updated on every batch before the losses from the current
model's detached features at the step's labelled pixels (train.py:160-164), saved in each step's
checkpoint and extended by zero rows for the classes a step adds (run.py:250-265). At ``t >= 1``:
``UNCE + 100 UNKD + 0.01 L_pm + 1e-3 L_fc + 1e-3 L_sep + 1e-3 L_fs`` (the ``--method SDR``
preset; no MiB classifier init, as the preset does not set ``init_balanced``).

``method.options.release_compat=true`` computes every term as the release does, its three bugs
included (:mod:`ucdseg.losses.sdr`); the default computes what the paper describes.

Under DDP each process updates its prototypes from its own images (SDR trains on one GPU); the
copy saved is rank 0's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import losses  # losses.sdr (torch) is imported when a term first runs
from ..losses.defaults import SDR_WEIGHTS
from .builtin import CE, MIB
from .method import LossContext, Option, StepSetup, StepState, Term
from .registry import register

if TYPE_CHECKING:
    import torch

__all__ = ["Prototypes", "MIB_SDR"]


class Prototypes(StepState):
    """SDR's class prototypes ``(C, D)`` and pixel counts ``(C,)`` over a run."""

    def __init__(self, prototypes: torch.Tensor, counts: torch.Tensor, drop_first: bool, release_compat: bool):
        self.prototypes, self.counts = prototypes, counts
        self.drop_first, self.release_compat = drop_first, release_compat
        self.labels_down: torch.Tensor | None = None  # the batch's labels at the features' size

    def before_losses(self, ctx: LossContext) -> None:
        features = ctx.out.stages[-1]
        self.labels_down = losses.sdr.downsample_labels(ctx.step_labels, features.shape[-2:])
        self.prototypes, self.counts = losses.sdr.update_prototypes(
            self.prototypes, self.counts, features.detach(), self.labels_down, drop_first=self.drop_first,
            release_compat=self.release_compat)

    def state_dict(self) -> dict:
        return {"prototypes": self.prototypes, "counts": self.counts}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.prototypes, self.counts = state["prototypes"], state["counts"]

    carry = state_dict


def prototypes(setup: StepSetup) -> Prototypes:
    """The step's prototypes: the previous step's, with zero rows for the step's new classes (at
    step 0: zeros). A checkpoint without them, or with prototypes of another size, is one line."""
    import torch

    model = setup.model
    dim = model.backbone.out_channels
    classes = setup.num_old + setup.num_new
    options = setup.options
    drop_first = setup.setting == "overlapped" or setup.step > 0  # train.py:465
    device = next(model.parameters()).device
    if setup.step == 0:
        return Prototypes(torch.zeros(classes, dim, device=device), torch.zeros(classes, dtype=torch.long, device=device),
                          drop_first, options["release_compat"])
    previous = setup.previous or {}
    if "prototypes" not in previous or "counts" not in previous:
        raise ValueError(f"{setup.source} holds no SDR prototypes (method state), which step {setup.step} of mib+sdr "
                         "needs; train its step 0 with method.name=mib+sdr")
    old, counts = previous["prototypes"], previous["counts"]
    if tuple(old.shape) != (setup.num_old, dim) or tuple(counts.shape) != (setup.num_old,):
        raise ValueError(f"{setup.source}: its SDR prototypes are {tuple(old.shape)} with counts {tuple(counts.shape)}; "
                         f"expected ({setup.num_old}, {dim}) and ({setup.num_old},): one per class of the previous "
                         "steps and one channel per backbone feature")
    new = torch.zeros(setup.num_new, dim, dtype=old.dtype, device=old.device)
    return Prototypes(torch.cat([old, new]).to(device), torch.cat([counts, counts.new_zeros(setup.num_new)]).to(device),
                      drop_first, options["release_compat"])


def matching(ctx: LossContext, release_compat: bool):
    features = ctx.out.stages[-1]
    old = losses.sdr.old_prediction_down(ctx.old.logits, features.shape[-2:])
    return losses.sdr.prototype_matching(features, ctx.state.prototypes, ctx.state.labels_down, old,
                                  release_compat=release_compat)


def clustering(ctx: LossContext, release_compat: bool):
    return losses.sdr.feature_clustering(ctx.out.stages[-1], ctx.state.prototypes, ctx.state.labels_down,
                                  release_compat=release_compat)


def separation(ctx: LossContext, release_compat: bool):
    return losses.sdr.feature_separation(ctx.out.stages[-1], ctx.state.labels_down, release_compat=release_compat)


def sparsification(ctx: LossContext):
    return losses.sdr.feature_sparsification(ctx.out.stages[-1], ctx.state.labels_down)


RELEASE_COMPAT = {"release_compat": Option(False, "compute the SDR terms as the release does, its three bugs "
                                           "included (docs/methods.md)")}
_W = SDR_WEIGHTS
MIB_SDR = register(MIB.extend(
    "mib+sdr", "MiB + SDR: prototype matching, attraction, repulsion and sparsification of the encoder features",
    terms={"unkd": MIB.terms["unkd"].with_weight(_W["unkd"]),
           "pm": Term(matching, _W["pm"], options=RELEASE_COMPAT), "fc": Term(clustering, _W["fc"], options=RELEASE_COMPAT),
           "sep": Term(separation, _W["sep"], options=RELEASE_COMPAT), "fs": Term(sparsification, _W["fs"])},
    options=RELEASE_COMPAT, classifier_init="none", step_state=prototypes, first_step_terms={"ce": CE}))
