"""Generate ``tests/parity/data/sdr.npz``: SDR's loss terms and prototype update, computed by the
release's own code on seeded inputs.

Release: https://github.com/LTTM/SDR, commit 8638296a6b3bd91157f1cd03b4728d91efda88e6. Used unchanged:

* ``utils/loss.py``: ``FeaturesClusteringSeparationLoss`` (attraction + repulsion, SDR preset
  options), ``DistillationEncoderPrototypesLoss`` (``loss_de_prototypes_sumafter=True``),
  ``FeaturesSparsificationLoss("max_maskedforclass", "exponential", "ratio")``;
* ``train.py``: ``Trainer._update_running_stats``, called as a plain function with a stand-in
  ``self`` holding the two attributes it reads (``num_classes``, ``device``).

The release imports sklearn, seaborn and MulticoreTSNE for a t-SNE plot the losses never reach here
(``train_step=1``); they are stubbed through ``sys.modules`` when missing, and so are the release's
``utils`` package (only ``utils.loss`` is loaded, from the checkout) and ``utils.run_utils``.
``_update_running_stats`` allocates an unused scratch tensor of width 2048 (train.py:471) into which
it copies each class mean; to run it at D = 8 its globals see a ``torch`` whose ``zeros`` gives that
scratch tensor D columns. That tensor is written (:475) and never read; the script checks that the
wrapped function returns exactly what the release's returns at D = 2048. Everything runs with float64 as torch's default
dtype, so that the release's ``torch.tensor(0.)`` accumulators (loss.py:366-367, 479) are float64.

Regenerate (from the repository root)::

    git -C <SDR mirror> archive 8638296 | tar -x -C /tmp/sdr_release
    OMP_NUM_THREADS=1 python tests/parity/make_sdr.py --release /tmp/sdr_release

Inputs per case (``<case>__<name>``): full-resolution ``labels`` (B, H, W), ``features``
(B, D, h, w), ``prototypes`` (C, D) for the losses, ``proto_state``/``count_state`` for the update,
``old_logits`` (B, C_old, H, W), float32 (only their argmax is used). Outputs: ``update_drop{0,1}_prototypes`` / ``_counts``
(``drop_first`` false: disjoint step 0; true: overlapped), ``fc``, ``sep``, ``pm``, ``fs`` and their
gradients ``<term>_grad`` with respect to the features (zeros where the release's value has no
gradient path).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import torch

RELEASE_COMMIT = "8638296a6b3bd91157f1cd03b4728d91efda88e6"
OUT = Path(__file__).resolve().parent / "data" / "sdr.npz"
H, W, h, w = 17, 23, 5, 6  # full-resolution labels, feature size (17/5 and 23/6 not integers)

#: case -> (batch size, label values drawn at full resolution, number of classes C, C_old, D)
CASES = {
    "b1": (1, [0, 0, 1, 2, 4, 255], 6, 4, 8),  # background and void present
    "b3": (3, [0, 0, 1, 2, 3, 4, 5, 255], 6, 4, 8),
    "b3_nobg": (3, [2, 4, 5, 255], 6, 4, 8),  # no background: bug 3
    "b1_nobg": (1, [1, 3, 255], 6, 4, 8),
    "b1_one": (1, [4, 4, 255], 6, 4, 8),  # one class: no in-loop division
    "b2_bgonly": (2, [0], 6, 4, 8),  # only background (drop_first would crash the release)
    "b1_many": (1, list(range(30)), 30, 10, 8),  # 30 classes at the feature size: cdist's mm mode
}
#: cases whose h*w feature pixels all get different classes (the rest of the labels stay random)
EVERY_CLASS = {"b1_many"}


def _stub(name: str, **attrs) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module


def _load(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_release(root: Path) -> tuple[types.ModuleType, types.ModuleType]:
    """The release's ``utils/loss.py`` and ``train.py``, with missing third-party modules stubbed."""
    def placeholder(*args, **kwargs):
        raise RuntimeError("stubbed release dependency called")

    for name, attrs in {
        "sklearn": {},
        "sklearn.manifold": {"TSNE": placeholder},
        "sklearn.decomposition": {k: placeholder for k in (
            "PCA", "KernelPCA", "FastICA", "FactorAnalysis", "NMF", "TruncatedSVD", "LatentDirichletAllocation")},
        "seaborn": {"set": lambda *a, **k: None, "scatterplot": placeholder, "color_palette": placeholder},
        "MulticoreTSNE": {"MulticoreTSNE": placeholder},
    }.items():
        try:
            importlib.import_module(name)
        except ImportError:
            _stub(name, **attrs)
    sys.path.insert(0, str(root))  # train.py's own imports resolve from the checkout
    utils = types.ModuleType("utils")
    utils.__path__ = []  # a package: only the submodules registered below exist
    utils.get_regularizer = placeholder
    sys.modules["utils"] = utils
    _stub("utils.run_utils")
    loss = _load("utils.loss", root / "utils" / "loss.py")
    utils.loss = loss
    train = _load("sdr_release_train", root / "train.py")
    return loss, train


def update_function(train: types.ModuleType, feat_dim: int):
    """``Trainer._update_running_stats`` whose scratch ``torch.zeros([C, 2048])`` (train.py:471,
    written at :475 and never read) has ``feat_dim`` columns; the code object is the release's."""
    original = train.Trainer._update_running_stats

    class TorchView(types.ModuleType):
        def __getattr__(self, item):
            return getattr(torch, item)

        @staticmethod
        def zeros(size, *args, **kwargs):
            if isinstance(size, list) and len(size) == 2 and size[1] == 2048:
                size = [size[0], feat_dim]
            return torch.zeros(size, *args, **kwargs)

    scope = dict(original.__globals__)
    scope["torch"] = TorchView("torch")
    return types.FunctionType(original.__code__, scope, original.__name__, original.__defaults__)


def _grad(value: torch.Tensor, features: torch.Tensor) -> np.ndarray:
    if not value.requires_grad:
        return np.zeros(features.shape)
    (grad,) = torch.autograd.grad(value, features, retain_graph=True, allow_unused=True)
    return np.zeros(features.shape) if grad is None else grad.numpy()


def make_case(loss, train, case: str, seed: int, batch: int, values: list[int], num_classes: int, num_old: int,
              feat_dim: int) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor(values)[torch.randint(len(values), (batch, H, W), generator=g)]
    if case in EVERY_CLASS:  # the source pixels of nearest down-sampling: floor(i * H / h)
        rows, cols = (torch.arange(h) * H) // h, (torch.arange(w) * W) // w
        labels[:, rows[:, None], cols[None, :]] = torch.randperm(h * w, generator=g).view(h, w)
    features = torch.randn(batch, feat_dim, h, w, generator=g).abs().requires_grad_(True)
    prototypes = torch.randn(num_classes, feat_dim, generator=g).abs()
    count_state = torch.randint(0, 20, (num_classes,), generator=g) * (torch.rand(num_classes, generator=g) < 0.6)
    proto_state = torch.randn(num_classes, feat_dim, generator=g).abs() * (count_state > 0)[:, None]
    old_logits = torch.randn(batch, num_old, H, W, generator=g).float()  # only its argmax is used
    out = {"labels": labels, "features": features.detach(), "prototypes": prototypes,
           "proto_state": proto_state, "count_state": count_state, "old_logits": old_logits}

    # train.py:161-163: labels at the feature size, then the update (before the losses)
    labels_down = torch.nn.functional.interpolate(
        input=labels.unsqueeze(dim=1).double(), size=(h, w), mode="nearest").long()
    self = types.SimpleNamespace(num_classes=num_classes, device="cpu")
    update = update_function(train, feat_dim)
    only_bg = set(values) == {0}
    for drop in (False, True):
        if drop and only_bg:
            continue  # the release raises IndexError (cl_present[-1] of an empty tensor)
        protos, counts = update(self, labels_down, features, False, drop, 0, proto_state.clone(),
                                count_state.clone())
        out[f"update_drop{int(drop)}_prototypes"], out[f"update_drop{int(drop)}_counts"] = protos, counts

    lfc_loss = loss.FeaturesClusteringSeparationLoss(device="cpu", num_classes=num_classes, logdir="",
                                                     feat_dim=feat_dim, lfc_sep_clust=1e-3)
    fc, sep = lfc_loss(labels=labels, outputs=None, features=features, train_step=1, step=1, epoch=0,
                       incremental_step=1, prototypes=prototypes.clone())
    pm_loss = loss.DistillationEncoderPrototypesLoss(device="cpu", num_classes=num_classes)
    pm = pm_loss(outputs=None, outputs_old=old_logits, features=features, features_old=None, labels=labels,
                 classes_old=num_old, incremental_step=1, sequential=False, overlapped=False,
                 loss_de_prototypes_sumafter=True, prototypes=prototypes.clone(), count_features=None)
    fs = loss.FeaturesSparsificationLoss("max_maskedforclass", "exponential", "ratio")(
        features=features, labels=labels)
    for name, value in (("fc", fc), ("sep", sep), ("pm", pm), ("fs", fs)):
        out[name] = value.detach()
        out[f"{name}_grad"] = _grad(value, features)
    out["labels"] = labels.to(torch.uint8)  # stored small; the tests read them back as int64
    return {k: np.asarray(v.numpy() if torch.is_tensor(v) else v) for k, v in out.items()}


def check_update_function(train) -> None:
    """:func:`update_function` changes nothing but the scratch width: at D = 2048 (where the width
    stays 2048) it returns exactly what the release's function returns, for B = 3."""
    g = torch.Generator().manual_seed(7)
    labels_down = torch.randint(0, 3, (3, 1, 3, 4), generator=g)
    feats = torch.randn(3, 2048, 3, 4, generator=g)
    protos, counts = torch.rand(3, 2048, generator=g), torch.tensor([2, 0, 5])
    self = types.SimpleNamespace(num_classes=3, device="cpu")
    a = train.Trainer._update_running_stats(self, labels_down, feats, False, True, 1, protos.clone(), counts.clone())
    b = update_function(train, 2048)(self, labels_down, feats, False, True, 1, protos.clone(), counts.clone())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release", type=Path, required=True, help="checkout of LTTM/SDR at 8638296")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    loss, train = load_release(args.release.resolve())
    check_update_function(train)
    arrays = {"release_commit": np.array(RELEASE_COMMIT), "feature_size": np.array([h, w])}
    for seed, (case, spec) in enumerate(CASES.items()):
        for key, value in make_case(loss, train, case, seed, *spec).items():
            arrays[f"{case}__{key}"] = value
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes, {len(CASES)} cases)")


if __name__ == "__main__":
    main()
