"""Benchmarks 3 and 4: data pipeline and evaluation on the embedded benchmark.

3. Data: generation of the embedded benchmark (``prepare_embedded``, default sizes: 2000 train,
   400 val, 64 px), the class-presence index (``scan_presence``) built in a fresh cache folder and
   then read from the cache, and the throughput of a training ``DataLoader``
   (``StepDataset`` + ``train_transforms(64)``, batch 16, step 0 of the ``6-1`` task, overlapped)
   with 0 and 2 worker processes, one epoch (worker start-up included).
4. Evaluation: ``ucdseg.engine.evaluation.confusion_matrix`` of a DeepLab-v3 ResNet-18 (random init) on
   the 400 validation images at 64 x 64 (native size, batch 32 as ``eval.batch_size``), and
   ``ConfusionMatrix.update`` per megapixel (4 x 512 x 512 random targets with 5 % void).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, log, median, summary, time_calls  # noqa: E402

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
TASK = ("embedded", "6-1")


def _prepare(tmp: Path, quick: bool) -> tuple[Path, dict]:
    from ucdseg.embedded import prepare_embedded

    sizes = {"num_train": 300, "num_val": 64} if quick else {"num_train": 2000, "num_val": 400}
    t0 = time.perf_counter()
    root = prepare_embedded(tmp / "embedded", fashion_mnist_dir=FASHION_MNIST, progress=False, **sizes)
    seconds = time.perf_counter() - t0
    images = sizes["num_train"] + sizes["num_val"]
    return root, {**sizes, "image_size": 64, "seconds": seconds, "images_per_s": images / seconds}


def _index(root: Path, tmp: Path, repeats: int) -> dict:
    from ucdseg.data import build_dataset
    from ucdseg.data.index import scan_presence

    train = build_dataset("embedded", root, "train")
    out: dict = {"images": len(train)}
    for label, workers in (("workers_auto", None), ("workers_0", 0)):
        first = []
        for r in range(repeats):
            cache = tmp / f"cache-{label}-{r}"
            t0 = time.perf_counter()
            scan_presence(train, workers=workers, progress=False, cache_dir=cache)
            first.append(time.perf_counter() - t0)
        cached = time_calls(lambda: scan_presence(train, workers=workers, progress=False, cache_dir=cache),
                            repeats=max(3, repeats), warmup=0)
        out[label] = {"first_build": {**summary(first), "images_per_s": len(train) / median(first)},
                      "cached": {**summary(cached), "images_per_s": len(train) / median(cached)}}
        out[label]["cached_speedup"] = median(first) / median(cached)
        log(f"  index {label}: first {len(train) / median(first):.0f} img/s, "
            f"cached {len(train) / median(cached):.0f} img/s")
    return out


def _loader(root: Path, tmp: Path, repeats: int) -> dict:
    from torch.utils.data import DataLoader

    from ucdseg.data import StepDataset, build_dataset, train_transforms
    from ucdseg.data.index import step_index
    from ucdseg.label_maps import train_lut
    from ucdseg.tasks import get_task

    task = get_task(*TASK)
    train = build_dataset("embedded", root, "train")
    index = step_index(train, task, "overlapped", 0, cache_dir=tmp / "cache-loader", progress=False)
    dataset = StepDataset(train, index.indices, train_lut(task, 0), train_transforms(64))
    out: dict = {"task": "/".join(TASK), "step": 0, "setting": "overlapped", "images": len(dataset),
                 "batch_size": 16, "crop": 64}
    for workers in (0, 2):
        def epoch() -> None:
            torch.manual_seed(0)
            loader = DataLoader(dataset, batch_size=16, shuffle=True, num_workers=workers)
            for _images, _targets in loader:
                pass

        times = time_calls(epoch, repeats=repeats, warmup=0)
        out[f"workers_{workers}"] = {**summary(times), "images_per_s": len(dataset) / median(times)}
        log(f"  loader workers={workers}: {len(dataset) / median(times):.0f} img/s")
    return out


def _evaluation(root: Path, repeats: int) -> dict:
    from torch.utils.data import DataLoader

    from ucdseg.data import StepDataset, build_dataset, eval_transforms
    from ucdseg.engine.evaluation import confusion_matrix as evaluate
    from ucdseg.label_maps import eval_lut
    from ucdseg.models import build_model
    from ucdseg.tasks import get_task

    task = get_task(*TASK)
    last = task.num_steps - 1
    val = build_dataset("embedded", root, "val")
    dataset = StepDataset(val, range(len(val)), eval_lut(task, last), eval_transforms(None))
    loader = DataLoader(dataset, batch_size=32, num_workers=0)
    torch.manual_seed(0)
    model = build_model("resnet18", task.classes_per_step)
    num_classes = len(task.seen(last))
    device = torch.device("cpu")
    times = time_calls(lambda: evaluate(model, loader, num_classes, device, progress=False), repeats=repeats,
                       warmup=1)
    # the model alone on the same images, to split model time from data loading + metric
    batches = [images for images, _ in loader]
    model.eval()

    def forward_only() -> None:
        with torch.no_grad():
            for images in batches:
                model(images).logits.argmax(1)

    fwd = time_calls(forward_only, repeats=repeats, warmup=0)
    log(f"  evaluate: {len(dataset) / median(times):.0f} img/s (model alone {len(dataset) / median(fwd):.0f} img/s)")
    return {"backbone": "resnet18", "images": len(dataset), "image_size": 64, "batch_size": 32, "workers": 0,
            "num_classes": num_classes, **summary(times), "images_per_s": len(dataset) / median(times),
            "model_forward_only": {**summary(fwd), "images_per_s": len(dataset) / median(fwd)}}


def confusion_matrix(repeats: int) -> dict:
    from ucdseg.engine.metrics import ConfusionMatrix

    gen = torch.Generator().manual_seed(0)
    shape = (4, 512, 512)
    megapixels = 4 * 512 * 512 / 1e6
    out: dict = {"batch_shape": list(shape), "void_fraction": 0.05}
    for n in (21, 151):
        target = torch.randint(0, n, shape, generator=gen)
        target[torch.rand(shape, generator=gen) < 0.05] = 255
        pred = torch.randint(0, n, shape, generator=gen)
        cm = ConfusionMatrix(n)
        times = time_calls(lambda: cm.update(target, pred), repeats=max(10, repeats), warmup=2)
        out[f"classes_{n}"] = {**summary(times), "ms_per_megapixel": 1e3 * median(times) / megapixels}
        log(f"  confusion matrix update ({n} classes): {1e3 * median(times) / megapixels:.1f} ms/MP")
    return out


def run(quick: bool = False) -> dict:
    """``{"data": {...}, "evaluation": {...}}``; everything happens in a temporary folder."""
    repeats = 1 if quick else 3
    tmp = Path(tempfile.mkdtemp(prefix="ucdseg-bench-data-"))
    try:
        root, generation = _prepare(tmp, quick)
        log(f"  embedded benchmark generated: {generation['images_per_s']:.0f} img/s")
        data = {"generation": generation, "index": _index(root, tmp, repeats),
                "loader": _loader(root, tmp, 1 if quick else 2), "load_after": load_average()}
        evaluation = {"evaluate": _evaluation(root, 1 if quick else 2), "confusion_matrix": confusion_matrix(repeats),
                      "load_after": load_average()}
        return {"data": data, "evaluation": evaluation}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
