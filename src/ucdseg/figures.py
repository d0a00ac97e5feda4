"""Pictures of class masks, below the engine and the reports that both draw them.

* :func:`save_figure`: every matplotlib figure ucdseg writes (a PNG at 110 dpi, cropped to what
  is drawn, written atomically through :mod:`ucdseg.io`, then closed); the reports' plots
  (:mod:`ucdseg.reporting`) and the prediction figure go through it;
* :func:`write_predictions`: a step's prediction figure (``predictions/stepN.png`` of a run: the
  first validation images, their ground truth and the model's prediction), drawn by the engine
  after each step (:func:`ucdseg.engine.evaluation.evaluate_step`);
* :func:`palette_png`: a class-id mask as a palette PNG (``ucdseg predict``'s masks, ``ucdseg
  eval --save-predictions``).

Matplotlib is imported when a figure is drawn, never at import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .data.meta import VOID, VOID_COLOR, colorize
from .io import atomic_path

__all__ = ["save_figure", "write_predictions", "palette_png"]


def save_figure(fig, path: Path) -> None:
    """Write ``fig`` as a PNG at ``path`` (atomically) and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def palette_png(mask: np.ndarray, palette: Sequence[Sequence[int]]) -> Image.Image:
    """A palette ("P") PNG image of a class-id mask, class ``k`` coloured ``palette[k]``."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(palette)] = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    lut[VOID] = VOID_COLOR
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    image.putpalette(lut.ravel().tolist())
    return image


@torch.no_grad()
def write_predictions(model, val_set, seen: Sequence[int], palette, device, path: Path, num_images: int = 4,
                      class_names: Sequence[str] | None = None, title: str = "", predict=None) -> None:
    """A picture of the first ``num_images`` validation images: image | ground truth | prediction,
    with a legend naming every class that appears in it (``class_names``: dataset space) and
    ``title`` above (the run, its method and step). ``model(x).logits`` gives the logits of a
    batch; ``predict``: the method's inference rule, logits -> model-space ids (default: argmax)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    model.eval()
    n = min(num_images, len(val_set))
    if n == 0:
        return
    # model-space ids -> dataset ids, so the dataset's palette colours them
    to_dataset = np.full(256, 255, dtype=np.uint8)
    to_dataset[: len(seen)] = seen
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    fig, axes = plt.subplots(n, 3, figsize=(6, 2 * n + (0.6 if class_names else 0)), squeeze=False)
    if title:
        fig.suptitle(title, fontsize=10)
    shown_ids: set[int] = set()
    for row in range(n):
        image, target = val_set[row]
        logits = model(image[None].to(device)).logits
        pred = (logits.argmax(1) if predict is None else predict(logits))[0].cpu().numpy().astype(np.uint8)
        masks = to_dataset[target.numpy().astype(np.uint8)], to_dataset[pred]
        shown_ids.update(int(c) for m in masks for c in np.unique(m))
        shown = (image * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        panels = [shown, colorize(masks[0], palette), colorize(masks[1], palette)]
        for ax, panel, name in zip(axes[row], panels, ("image", "ground truth", "prediction")):
            ax.imshow(panel, interpolation="nearest")  # small scenes: show their pixels, not a blur
            ax.set_axis_off()
            if row == 0:
                ax.set_title(name, fontsize=9)
    if class_names:
        handles = [Patch(facecolor=np.asarray(palette[c]) / 255, edgecolor="black", label=class_names[c])
                   for c in sorted(shown_ids - {255})]
        if 255 in shown_ids:
            handles.append(Patch(facecolor=np.asarray(VOID_COLOR) / 255, edgecolor="black", label="void"))
        fig.legend(handles=handles, loc="lower center", ncol=min(4, len(handles)), fontsize=7, frameon=False)
        fig.subplots_adjust(bottom=0.6 / (2 * n + 0.6) + 0.04)
    save_figure(fig, path)
