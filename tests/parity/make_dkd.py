"""Parity data for DKD (ucdseg.losses.dkd, and DKD's copy of the sampler in ucdseg.data.memory), made by the
release's code.

Release: cvlab-yonsei/DKD, commit fb4693f ("Update train_voc_15-1.sh"). Everything below runs the release's
own code, unchanged, on seeded inputs:

* losses: the ``with torch.cuda.amp.autocast(...)`` blocks of ``Trainer_incremental._train_epoch``
  (trainer/trainer_voc.py:340-376, every loss term and the weighted total) and ``Trainer_base._train_epoch``
  (trainer_voc.py:118-128, step 0), extracted with ``ast`` and executed with a stand-in ``self`` whose
  ``BCELoss``/``ACLoss``/``KDLoss`` are built by the release's own ``__init__`` statements (trainer_voc.py:48-49,
  84-86, 304) from models/loss.py, and whose weights come from configs/config_voc.json; the stand-in models
  return our logits and the release's decomposed logits ``DeepLabV3.forward_class_prediction_positive`` /
  ``_negative`` (models/model.py:77-99) of our features and classifier weights. Every term is differentiated
  (``torch.autograd.grad``) with respect to the logits, the features and the weights;
* inference: the prediction lines of ``Trainer_base._valid_epoch`` (trainer_voc.py:181-185);
* memory: ``utils.memory.memory_sampling_balanced`` (utils/memory.py:46-175), imported and called with a
  stand-in loader and old model; ``np.random.shuffle`` is recorded (the same global-RNG draws).

``L_mbce`` is generated in float32: the release builds its targets with ``.float()`` (models/loss.py:74) so
float64 logits would be computed in float32 anyway. The other terms are float64.

Command (from the repository root):

    git -C <DKD mirror> archive fb4693f | tar -x -C /tmp/dkd   # an empty /tmp/dkd
    OMP_NUM_THREADS=1 PYTHONPATH=src python tests/parity/make_dkd.py --release /tmp/dkd

writes tests/parity/data/dkd.npz.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import ReleaseFile, ShuffleRecorder, json_array, stub_module  # noqa: E402

OUT = Path(__file__).resolve().parent / "data" / "dkd.npz"
B, H, W, D, h, w = 2, 6, 6, 8, 3, 3
N_OLD, N_NEW = 3, 2  # fg classes 1..3 old, 4..5 new


def import_release(root: Path):
    sys.path.insert(0, str(root))
    # modules the rules do not use (backbones, datasets, trainers, pandas-based loggers)
    stub_module("pandas")
    stub_module("models.modules", ResNet101=None, ASPP=None)
    stub_module("data_loader.data_loaders")
    stub_module("trainer")
    stub_module("trainer.trainer_voc", Trainer_base=None, Trainer_incremental=None)
    import models.loss as loss
    import models.model as model
    import utils.memory as memory

    return loss, model, memory


class Stand:
    """A stand-in object: attributes given at construction."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def make_self(trainer: ReleaseFile, loss, config: dict, n_old: int, n_new: int, incremental: bool) -> Stand:
    """A stand-in trainer whose criteria are made by the release's own __init__ statements."""
    me = Stand(task_info={"old_class": list(range(1, n_old + 1)), "new_class": list(range(n_old + 1, n_old + n_new + 1))},
               device="cpu", config=config)
    init = trainer.function("Trainer_base.__init__")
    stmts = [trainer.find(init, p) for p in ("self.n_old_classes =", "self.n_new_classes =", "pos_weight =",
                                              "self.BCELoss =", "self.ACLoss =")]
    if incremental:
        stmts.append(trainer.find(trainer.function("Trainer_incremental.__init__"), "self.KDLoss ="))
    ns = {"self": me, "torch": torch, "WBCELoss": loss.WBCELoss, "KDLoss": loss.KDLoss, "ACLoss": loss.ACLoss}
    trainer.run(stmts, ns)
    me.init_lines = trainer.lines(stmts)
    return me


def classifiers(weights: list[torch.Tensor]) -> nn.ModuleList:
    """``cls``: 1x1 convs (aux first, then one per step) holding the given weights."""
    mods = nn.ModuleList()
    for wt in weights:
        conv = nn.Conv2d(wt.shape[1], wt.shape[0], 1, bias=True).to(wt.dtype)
        with torch.no_grad():
            conv.weight.copy_(wt[:, :, None, None])
        mods.append(conv)
    return mods


def loss_case(trainer: ReleaseFile, loss, model, config: dict, rng, dtype, incremental: bool) -> dict:
    n_old = N_OLD if incremental else 0
    n_new = N_NEW if incremental else N_OLD + N_NEW
    me = make_self(trainer, loss, config, n_old, n_new, incremental)
    c_fg = N_OLD + N_NEW
    t = lambda a, grad=True: torch.from_numpy(np.asarray(a)).to(dtype).requires_grad_(grad)  # noqa: E731
    logit_fg = t(rng.normal(0, 2, (B, c_fg, H, W)))
    logit_aux = t(rng.normal(-1, 2, (B, 1, H, W)))
    x_pl = t(rng.normal(0, 1, (B, D, h, w)))
    w_fg = [t(rng.normal(0, 0.5, (N_OLD, D))), t(rng.normal(0, 0.5, (N_NEW, D)))] if incremental else [t(rng.normal(0, 0.5, (c_fg, D)))]
    w_fg[0].data[0, 0] = 0.0  # an exact zero weight: neither positive nor negative
    labels = torch.from_numpy(rng.choice([0, 0, 0, n_old + 1, n_old + 2, 255] if incremental else [0, 0, 1, 3, 5, 255], size=(B, H, W)))
    cls = classifiers([torch.zeros(1, D, dtype=dtype)] + list(w_fg))
    # the decomposed logits use mod.weight: make those our leaf tensors
    for mod, wt in zip(list(cls)[1:], w_fg):
        del mod.weight
        mod.weight = wt[:, :, None, None]
    fake = Stand(cls=cls)
    pos = model.DeepLabV3.forward_class_prediction_positive(fake, x_pl)
    neg = model.DeepLabV3.forward_class_prediction_negative(fake, x_pl)
    logit = torch.cat([logit_aux, logit_fg], 1)
    me.model = lambda image, ret_intermediate=False: (logit, {"pos_reg": pos, "neg_reg": neg} if ret_intermediate else {})
    out = {"logits": logit_fg, "aux": logit_aux, "features": x_pl, "labels": labels}
    out.update({f"weight{i}": wt for i, wt in enumerate(w_fg)})
    if incremental:
        old_fg = torch.from_numpy(rng.normal(0, 2, (B, N_OLD, H, W))).to(dtype)
        old_aux = torch.from_numpy(rng.normal(0, 2, (B, 1, H, W))).to(dtype)
        x_old = torch.from_numpy(rng.normal(0, 1, (B, D, h, w))).to(dtype)
        w_old = torch.from_numpy(rng.normal(0, 0.5, (N_OLD, D))).to(dtype)
        fake_old = Stand(cls=classifiers([torch.zeros(1, D, dtype=dtype), w_old]))
        with torch.no_grad():
            pos_old = model.DeepLabV3.forward_class_prediction_positive(fake_old, x_old)
            neg_old = model.DeepLabV3.forward_class_prediction_negative(fake_old, x_old)
        me.model_old = lambda image, ret_intermediate=False: (torch.cat([old_aux, old_fg], 1), {"pos_reg": pos_old, "neg_reg": neg_old})
        out.update(old_logits=old_fg, old_features=x_old, old_weight=w_old)
        block = trainer.find(trainer.function("Trainer_incremental._train_epoch"), "with torch.cuda.amp.autocast", ast.With)
        terms = ["loss_mbce", "loss_kd", "loss_ac", "loss_dkd_pos", "loss_dkd_neg", "loss"]
    else:
        block = trainer.find(trainer.function("Trainer_base._train_epoch"), "with torch.cuda.amp.autocast", ast.With)
        terms = ["loss_mbce", "loss_ac", "loss"]
    ns = trainer.run([block], {"self": me, "torch": torch, "data": {"image": None, "label": labels}})
    inputs = {"logits": logit_fg, "aux": logit_aux, "features": x_pl, **{f"weight{i}": wt for i, wt in enumerate(w_fg)}}
    for term in terms:
        value = ns[term].sum()  # the per-class vectors are summed into the total (trainer_voc.py:374-376)
        out[term] = value
        grads = torch.autograd.grad(value, list(inputs.values()), retain_graph=True, allow_unused=True)
        for (name, inp), g in zip(inputs.items(), grads):
            out[f"{term}_grad_{name}"] = torch.zeros_like(inp) if g is None else g
    out["pos_reg"], out["neg_reg"] = pos, neg
    out["lines"] = me.init_lines + ";" + trainer.lines([block])
    return {k: (v.detach().numpy() if torch.is_tensor(v) else np.array(v)) for k, v in out.items()}


def predict_case(trainer: ReleaseFile, rng) -> dict:
    fn = trainer.function("Trainer_base._valid_epoch")
    stmts = trainer.span(fn, "logit = torch.sigmoid(logit)", "pred[idx == 0] = 0")
    fg = rng.normal(-1.5, 1.5, (2, 5, 4, 6))
    fg[0, :, 0, 0] = -3.0  # every foreground sigmoid < 0.5: background
    fg[0, :, 0, 1] = 0.0  # sigmoid exactly 0.5 everywhere: not > 0.5, background
    fg[1, :, 1, 1] = [-2.0, 1.0, 1.0, -1.0, 0.5]  # a tie: the first maximum
    logit = torch.from_numpy(np.concatenate([rng.normal(0, 1, (2, 1, 4, 6)), fg], 1))
    ns = trainer.run(stmts, {"torch": torch, "logit": logit.clone()})
    return {"predict_logits": fg, "predict_out": ns["pred"].numpy(), "predict_lines": trainer.lines(stmts)}


def memory_case(memory, tmp: Path, task_step: int, labels, old, prev_memory: list, mem_size: int, seed: int) -> dict:
    n = labels.shape[0]

    class Loader:  # batches of 4 as the release's DataLoader gives them (dicts), in order
        def __iter__(self):
            for s in range(0, n, 4):
                idx = list(range(s, min(n, s + 4)))
                yield {"image": torch.tensor(idx, dtype=torch.float64), "label": torch.from_numpy(labels[idx]).long(),
                       "image_name": [f"JPEGImages/name{i:03d}.jpg x" for i in idx]}

        def __len__(self):
            return (n + 3) // 4

    class Model(nn.Module):
        def forward(self, images, ret_intermediate=False):
            return torch.from_numpy(old[images.long().numpy()]), {}

    save_dir = tmp / f"run{seed}_{mem_size}" / f"step_{task_step}"
    for s in (task_step - 1, task_step):
        (save_dir.parent / f"step_{s}").mkdir(parents=True, exist_ok=True)
    if task_step > 1:
        with open(save_dir.parent / f"step_{task_step - 1}" / "memory.json", "w") as f:
            json.dump({f"step_{task_step - 1}": {"memory_candidates": prev_memory, "memory_list": []}}, f)
    config = {"n_gpu": 0, "multiprocessing_distributed": False, "data_loader": {"args": {"memory": {"mem_size": mem_size}}}}
    config = type("Config", (dict,), {})(config)
    config.save_dir = save_dir
    dumped = {}
    recorder = ShuffleRecorder(np.random.shuffle)
    logger = Stand(info=lambda *a: None, warning=lambda *a: None)
    saved_json, saved = memory.json, (torch.distributed.barrier, torch.distributed.get_rank, np.random.shuffle)
    try:
        memory.json = types.SimpleNamespace(load=json.load, dump=lambda obj, f: (dumped.update(obj), json.dump(obj, f)))
        torch.distributed.barrier, torch.distributed.get_rank = (lambda *a, **k: None), (lambda *a, **k: 0)
        np.random.shuffle = recorder
        np.random.seed(seed)
        memory.memory_sampling_balanced(config, Model(), Loader(), ("voc", "overlap", "15-1", task_step), logger, None)
    finally:
        memory.json = saved_json
        torch.distributed.barrier, torch.distributed.get_rank, np.random.shuffle = saved
    (cands, perm_c), (classes, perm_k) = recorder.calls
    ident = {id(c): i for i, c in enumerate(cands)}
    return {
        "task_step": task_step, "size": mem_size, "n_prev_memory": len(prev_memory),
        "candidate_classes": [c[1] for c in cands], "candidate_order": perm_c,
        "class_list": classes, "class_perm": perm_k,
        "expected_positions": [ident[id(m)] for m in dumped[f"step_{task_step}"]["memory_candidates"]],
    }


def memory_cases(memory, rng, tmp: Path) -> dict:
    n = 24
    # step-1 images of 15-1 (class 16 only; DKD's masks keep the step's classes) and the step-1 model's
    # outputs [aux, 1..16]
    y2 = rng.choice([0, 0, 0, 0, 16, 255], size=(n, 4, 4))
    y2[rng.random(n) < 0.2] = 0
    old2 = rng.normal(0.0, 2.0, (n, 17, 4, 4)).astype(np.float32)
    y1 = np.stack([rng.choice([0, 0, 0, 255, *rng.choice(np.arange(1, 16), 2)], size=(4, 4)) for _ in range(n)])
    y1[rng.random(n) < 0.2] = 0
    prev = [[f"JPEGImages/prev{i}.jpg x", sorted(set(rng.choice(np.arange(1, 16), 2).tolist()))] for i in range(6)]
    cases = [
        memory_case(memory, tmp, 1, y1, None, [], 10, seed=11),
        memory_case(memory, tmp, 2, y2, old2, prev, 14, seed=12),
    ]
    eligible = sum(any(1 <= c <= 16 for c in cl) for cl in cases[0]["candidate_classes"])
    cases.append(memory_case(memory, tmp, 1, y1, None, [], eligible, seed=13))
    return {"memory_cases": json_array(cases), "memory_step1_labels": y1.astype(np.uint8),
            "memory_step2_labels": y2.astype(np.uint8), "memory_step2_old_logits": old2}


def main_() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release", type=Path, required=True, help="a checkout of cvlab-yonsei/DKD at fb4693f")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    root = args.release.resolve()
    loss, model, memory = import_release(root)
    trainer = ReleaseFile(root, "trainer/trainer_voc.py")
    config = json.loads((root / "configs" / "config_voc.json").read_text())
    config["use_amp"] = False  # CPU
    rng = np.random.default_rng(20221128)
    torch.set_num_threads(1)
    data = {}
    step0 = dict(config, hyperparameter=dict(config["hyperparameter"], pos_weight=2))  # --pos_weight 2 at step 0
    for prefix, cfg, dtype, incremental in (("inc64_", config, torch.float64, True), ("inc32_", config, torch.float32, True),
                                            ("base64_", step0, torch.float64, False), ("base32_", step0, torch.float32, False)):
        data.update({prefix + k: v for k, v in loss_case(trainer, loss, model, cfg, rng, dtype, incremental).items()})
    data.update(predict_case(trainer, rng))
    with tempfile.TemporaryDirectory() as tmp:
        data.update(memory_cases(memory, rng, Path(tmp)))
    data["weights"] = json_array({k: config["hyperparameter"][k] for k in ("mbce", "kd", "dkd_pos", "dkd_neg", "ac")})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, release=np.array("cvlab-yonsei/DKD@fb4693f"), **data)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main_()
