"""Parity data for SSUL (ucdseg.losses.ssul, and the sampler of ucdseg.data.memory), made by the release's code.

Release: clovaai/SSUL, commit e08ee9c ("Update REAME.md (set preparation link)"). Everything below runs the
release's own code, unchanged, on seeded inputs:

* labels: ``VOCSegmentation.__getitem__`` / ``ADESegmentation.__getitem__`` (datasets/voc.py:111-143,
  datasets/ade.py:270-300) on PNG files written here (identity class mapping), with the release's
  ``ExtToTensor``;
* pseudo-labels and loss: the ``if opts.pseudo and opts.curr_step > 0:`` block of ``main()``
  (main.py:451-466) and the ``criterion = utils.BCEWithLogitsLossWithIgnoreIndex(...)`` statement
  (main.py:397-398), extracted with ``ast`` and executed; the loss is backpropagated;
* inference: ``validate()`` (main.py:150-178), extracted with ``ast``, called with a stand-in model;
* memory: ``utils.memory.memory_sampling_balanced`` (utils/memory.py:19-136), imported and called with a
  stand-in dataset and old model; ``np.random.shuffle`` is recorded (the same global-RNG draws) so that
  the tests can replay the two orders it drew.

The loss runs in float32: the release casts its one-hot targets to float32 (utils/loss.py:35), so float64
logits would be computed in float32 anyway. The rest is float64 where the release allows it.

Command (from the repository root):

    git -C <SSUL mirror> archive e08ee9c | tar -x -C /tmp/ssul   # an empty /tmp/ssul
    OMP_NUM_THREADS=1 PYTHONPATH=src python tests/parity/make_ssul.py --release /tmp/ssul

writes tests/parity/data/ssul.npz.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import ReleaseFile, ShuffleRecorder, json_array, namespace_package, stub_module  # noqa: E402

OUT = Path(__file__).resolve().parent / "data" / "ssul.npz"


def import_release(root: Path):
    sys.path.insert(0, str(root))
    stub_module("visdom", Visdom=object)  # utils/__init__.py imports the visualizer; not used here
    # datasets/__init__.py imports a cityscapes.py that the release does not ship: load the package
    # without it, then the two readers the rules live in
    pkg = namespace_package("datasets", root / "datasets")
    import datasets.ade as ade
    import datasets.voc as voc

    pkg.VOCSegmentation, pkg.ADESegmentation = voc.VOCSegmentation, ade.ADESegmentation
    import utils  # the release's utils package (loss, ext_transforms, tasks)
    import utils.memory as memory
    from utils import ext_transforms as et

    return voc, ade, utils, memory, et


# ------------------------------------------------------------------------------------------------
# labels
# ------------------------------------------------------------------------------------------------
def label_cases(voc, ade, et, rng, tmp: Path) -> dict:
    n, h, w = 3, 5, 7
    labels = rng.choice([0, 0, 0, 3, 7, 16, 255], size=(n, h, w)).astype(np.uint8)
    saliency = rng.choice([0, 0, 1, 128, 255], size=(n, h, w)).astype(np.uint8)
    for sub in ("JPEGImages", "SegmentationClassAug", "saliency_map"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    names = [f"img{i}" for i in range(n)]
    for i, name in enumerate(names):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp / "JPEGImages" / f"{name}.jpg")
        Image.fromarray(labels[i]).save(tmp / "SegmentationClassAug" / f"{name}.png")
        Image.fromarray(saliency[i]).save(tmp / "saliency_map" / f"{name}.png")
    out = {}
    for key, cls, n_cls in (("voc", voc.VOCSegmentation, 21), ("ade", ade.ADESegmentation, 151)):
        ds = cls.__new__(cls)  # the reader's attributes, set as its __init__ would, without a real dataset
        ds.image_set, ds.unknown, ds.transform = "train", True, et.ExtCompose([et.ExtToTensor()])
        ds.file_names = names
        ds.images = [str(tmp / "JPEGImages" / f"{x}.jpg") for x in names]
        ds.masks = [str(tmp / "SegmentationClassAug" / f"{x}.png") for x in names]
        ds.sal_maps = [str(tmp / "saliency_map" / f"{x}.png") for x in names]
        ds.target_cls = list(range(n_cls)) + [255]
        ds.ordering_map = np.arange(256, dtype=np.uint8)
        out[f"labels_{key}_out"] = np.stack([ds[i][1].numpy() for i in range(n)])
    out["labels_in"], out["labels_saliency"] = labels, saliency
    return out


# ------------------------------------------------------------------------------------------------
# pseudo-labels + loss, inference
# ------------------------------------------------------------------------------------------------
def loss_cases(main: ReleaseFile, utils, rng) -> dict:
    fn = main.function("main")
    crit = [main.find(fn, "criterion = utils.BCEWithLogitsLossWithIgnoreIndex")]
    pseudo_if = main.find(fn, "if opts.pseudo and opts.curr_step > 0", ast.If)
    b, h, w, c_new, c_old = 2, 6, 5, 18, 17  # 15-1 step 1: [unknown, bg, 1..15] old, +[16] new
    labels = torch.from_numpy(rng.choice([0, 1, 1, 1, 5, 17, 255], size=(b, h, w))).long()
    outputs = torch.from_numpy(rng.normal(0, 2, (b, c_new, h, w)).astype(np.float32)).requires_grad_(True)
    old = torch.from_numpy(rng.normal(-1, 2.5, (b, c_old, h, w)).astype(np.float32))
    ns = {"torch": torch, "utils": utils}
    main.run(crit, ns)
    ns.update(
        opts=types.SimpleNamespace(pseudo=True, curr_step=1, loss_type="bce_loss", pseudo_thresh=0.7),
        model_prev=lambda images: old, images=None, labels=labels, fg_idx=1, outputs=outputs,
    )
    main.run([pseudo_if], ns)
    ns["loss"].backward()
    # the same criterion on the shifted labels directly (no pseudo-labels)
    outputs2 = outputs.detach().clone().requires_grad_(True)
    loss2 = ns["criterion"](outputs2, labels)
    loss2.backward()
    return {
        "loss_labels": labels.numpy(), "loss_logits": outputs.detach().numpy(), "loss_old_logits": old.numpy(),
        "pseudo_labels": ns["pseudo_labels"].numpy(), "pseudo_loss": ns["loss"].detach().numpy(),
        "pseudo_loss_grad": outputs.grad.numpy(), "plain_loss": loss2.detach().numpy(),
        "plain_loss_grad": outputs2.grad.numpy(),
        "lines_loss": main.lines(crit + [pseudo_if]),
    }


def predict_cases(main: ReleaseFile, rng) -> dict:
    validate = main.function("validate")
    ns = main.run([validate], {"torch": torch})
    logits = torch.from_numpy(rng.normal(0, 2, (2, 18, 4, 6)))
    # one image per batch; the "image" is its index, which the stand-in model maps to its logits
    batches = [(torch.tensor([float(i)]), torch.zeros(1, 4, 6, dtype=torch.long), None, None) for i in range(2)]

    class Metrics:
        preds: list = []

        def reset(self):
            self.preds = []

        def update(self, targets, preds):
            self.preds.append(preds)

        def get_results(self):
            return np.concatenate(self.preds)

    def model(images):
        return logits[images.long()].clone()

    preds = ns["validate"](types.SimpleNamespace(loss_type="bce_loss", unknown=True), model, batches, "cpu", Metrics())
    return {"predict_logits": logits.numpy(), "predict_out": preds, "lines_predict": main.lines([validate])}


# ------------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------------
def memory_data(rng, curr_step: int, n_images: int, h: int = 4, w: int = 4):
    """Model-space labels of the previous step's images, SSUL's shifted labels of them, old logits."""
    c_prev = 18 if curr_step == 2 else 17  # old model: [unknown, bg, 1..15(, 16)]
    if curr_step == 1:  # step-0 images: base classes 1..15
        y = np.stack([rng.choice([0, 0, 0, 255, *rng.choice(np.arange(1, 16), 2)], size=(h, w)) for _ in range(n_images)])
    else:  # step-1 images: class 16 only (others are background in the step's labels)
        y = rng.choice([0, 0, 0, 0, 16, 255], size=(n_images, h, w))
    y[rng.random(n_images) < 0.15] = 0  # a few background-only images
    sal = rng.random((n_images, h, w)) < 0.3
    shifted = np.where(y == 255, 255, y + 1)
    shifted = np.where((shifted == 1) & sal, 0, shifted)  # unknown, as SSUL's train labels (values only)
    old = rng.normal(-1.5, 2.5, (n_images, c_prev, h, w)).astype(np.float32)
    return y, shifted, old


def memory_case(memory, tmp: Path, curr_step: int, data, prev_memory: list, mem_size: int, seed: int):
    """One call of memory_sampling_balanced on stand-in data; returns what the tests need (JSON-able)."""
    y, shifted, old = data
    n_images, h, w = y.shape

    class Dataset(torch.utils.data.Dataset):
        def __init__(self, opts, image_set, transform, cil_step):
            assert image_set == "train" and cil_step == curr_step - 1

        def __len__(self):
            return n_images

        def __getitem__(self, i):
            image = torch.full((3, h, w), float(i))  # carries its index to the stand-in model
            return image, torch.from_numpy(shifted[i]).long(), torch.zeros(h, w), f"name{i:03d}"

    def prev_model(images):
        return torch.from_numpy(old[images[:, 0, 0, 0].long().numpy()])

    cwd = os.getcwd()
    workdir = tmp / f"mem{seed}_{mem_size}"
    (workdir / "datasets" / "data" / "voc").mkdir(parents=True)
    if curr_step > 1:
        with open(workdir / "datasets" / "data" / "voc" / "memory.json", "w") as f:
            json.dump({f"step_{curr_step - 1}": {"memory_candidates": prev_memory, "memory_list": []}}, f)
    dumped = {}
    recorder = ShuffleRecorder(np.random.shuffle)
    patches = {
        "VOCSegmentation": Dataset,
        "data": types.SimpleNamespace(DataLoader=lambda ds, **kw: torch.utils.data.DataLoader(ds, **{**kw, "num_workers": 0})),
        "json": types.SimpleNamespace(load=json.load, dump=lambda obj, f: (dumped.update(obj), json.dump(obj, f))),
    }
    saved = {k: getattr(memory, k) for k in patches}
    cuda, shuffle = torch.Tensor.cuda, np.random.shuffle
    opts = types.SimpleNamespace(unknown=True, crop_size=h, dataset="voc", curr_step=curr_step, batch_size=4,
                                 task="15-1", loss_type="bce_loss", mem_size=mem_size)
    try:
        os.chdir(workdir)
        for k, v in patches.items():
            setattr(memory, k, v)
        torch.Tensor.cuda = lambda self, *a, **k: self
        np.random.shuffle = recorder
        np.random.seed(seed)
        memory.memory_sampling_balanced(opts, prev_model)
    finally:
        os.chdir(cwd)
        for k, v in saved.items():
            setattr(memory, k, v)
        torch.Tensor.cuda, np.random.shuffle = cuda, shuffle
    (cands, perm_c), (classes, perm_k) = recorder.calls
    ident = {id(c): i for i, c in enumerate(cands)}
    sampled = dumped[f"step_{curr_step}"]["memory_candidates"]
    return {
        "curr_step": curr_step, "size": mem_size,
        "candidate_names": [c[0] for c in cands],
        "candidate_classes": [c[3] for c in cands],
        "n_prev_memory": len(prev_memory),
        "candidate_order": perm_c, "class_list": classes, "class_perm": perm_k,
        "expected_positions": [ident[id(m)] for m in sampled],
        "memory_list": dumped[f"step_{curr_step}"]["memory_list"],
    }


def memory_cases(memory, rng, tmp: Path) -> dict:
    prev = [[f"prev{i}", 1, 3, sorted(set(rng.choice(np.arange(1, 16), 2).tolist()))] for i in range(6)]
    step1, step2 = memory_data(rng, 1, 24), memory_data(rng, 2, 24)
    cases = [
        memory_case(memory, tmp, 1, step1, prev_memory=[], mem_size=12, seed=1),
        memory_case(memory, tmp, 2, step2, prev_memory=prev, mem_size=16, seed=2),
    ]
    # every candidate that holds an old class is taken: classes run out one by one and are skipped
    # (step 1 also has background-only candidates, which are never taken)
    for case, data, prev_mem, seed in ((cases[0], step1, [], 3), (cases[1], step2, prev, 4)):
        eligible = sum(any(1 <= c <= 16 for c in cl) for cl in case["candidate_classes"])
        cases.append(memory_case(memory, tmp, case["curr_step"], data, prev_memory=prev_mem, mem_size=eligible, seed=seed))
    # the images' model-space labels and the old logits, for the pseudo-label presence test
    return {"memory_cases": json_array(cases), "memory_step1_labels": step1[0].astype(np.uint8),
            "memory_step2_labels": step2[0].astype(np.uint8), "memory_step2_old_logits": step2[2]}


def main_() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release", type=Path, required=True, help="a checkout of clovaai/SSUL at e08ee9c")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    root = args.release.resolve()
    voc, ade, utils, memory, et = import_release(root)
    main_file = ReleaseFile(root, "main.py")
    rng = np.random.default_rng(20210922)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = {}
        data.update(label_cases(voc, ade, et, rng, Path(tmp)))
        data.update(loss_cases(main_file, utils, rng))
        data.update(predict_cases(main_file, rng))
        data.update(memory_cases(memory, rng, Path(tmp)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, release=np.array("clovaai/SSUL@e08ee9c"), **data)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main_()
