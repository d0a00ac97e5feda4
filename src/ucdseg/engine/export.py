"""The predictions of a step's model on the whole validation set, as files
(``ucdseg eval CHECKPOINT --save-predictions DIR``).

Each validation image gives ``DIR/<image stem>.png``: a palette PNG of the dataset's class ids
(the ids of the dataset's own masks, coloured with its palette, as VOC's ``SegmentationClass``),
at the image's own size, so the files can be scored by another tool or compared with the
ground truth in any viewer. Every validation image is written, whatever ``eval.images`` keeps
for the scores; the model predicts only the classes seen up to its step.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import io
from ..data import eval_transforms
from ..figures import palette_png

__all__ = ["save_predictions"]


@torch.no_grad()
def save_predictions(model: torch.nn.Module, val_set, seen: list[int], out_dir: str | Path, device: torch.device,
                     progress: bool = True) -> int:
    """Write the prediction of every image of ``val_set`` (a raw dataset) to ``out_dir``; returns
    how many. ``seen``: the dataset ids of the model's channels, in model order."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--save-predictions {out_dir} is a file; give a folder")
    stems = [Path(val_set.image_path(i)).stem for i in range(len(val_set))]
    repeated = sorted({s for s in stems if stems.count(s) > 1}) if len(set(stems)) < len(stems) else []
    if repeated:
        raise ValueError(f"validation images share the file name {repeated[0]!r}: their predictions would overwrite "
                         "each other")
    to_dataset = np.asarray(seen, dtype=np.uint8)
    transform = eval_transforms(None)  # the image's own size
    palette = val_set.meta.palette
    model.eval()
    for i in tqdm(range(len(val_set)), desc="saving predictions", unit="img", disable=not progress, leave=False):
        image = val_set.load_image(i)
        x, _ = transform(image, np.zeros((image.height, image.width), dtype=np.uint8))
        pred = model(x[None].to(device)).logits.argmax(1)[0].cpu().numpy()
        buffer = BytesIO()
        palette_png(to_dataset[pred], palette).save(buffer, format="PNG")
        io.write_bytes(out_dir / f"{stems[i]}.png", buffer.getvalue())
    return len(val_set)
