"""Draws docs/img/embedded_samples.png: eight scenes of the embedded benchmark and their masks.

    python scripts/make_embedded_figure.py [--output docs/img/embedded_samples.png] [--seed 0]

It generates a small benchmark (the default recipe, 64 x 64 scenes) in a temporary folder, reads
it back with ``build_dataset("embedded", ...)`` and shows image / colourised mask pairs with a
legend of the classes (void, 255, in cream).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from ucdseg.data import build_dataset, colorize  # noqa: E402
from ucdseg.embedded import prepare_embedded  # noqa: E402
from ucdseg.data.meta import VOID_COLOR  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parents[1] / "docs" / "img" / "embedded_samples.png"
    parser.add_argument("--output", default=str(default))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fashion-mnist", default=None, help="folder of the Fashion-MNIST IDX files")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = prepare_embedded(Path(tmp) / "embedded", num_train=8, num_val=1, seed=args.seed,
                                fashion_mnist_dir=args.fashion_mnist, progress=False)
        data = build_dataset("embedded", root, "train")
        pairs = [(np.asarray(data.load_image(i)), data.load_mask(i)) for i in range(8)]
        meta = data.meta

    fig, axes = plt.subplots(4, 4, figsize=(8, 8.6))
    for k, (image, mask) in enumerate(pairs):
        row, col = divmod(k, 2)
        ax_img, ax_mask = axes[row, 2 * col], axes[row, 2 * col + 1]
        ax_img.imshow(image, interpolation="nearest")
        ax_mask.imshow(colorize(mask, meta.palette), interpolation="nearest")
        present = [int(c) for c in np.unique(mask) if 0 < c < 255]
        ax_mask.set_title(", ".join(meta.class_names[c] for c in present), fontsize=7)
        ax_img.set_title(f"train scene {k}", fontsize=7)
        for ax in (ax_img, ax_mask):
            ax.set_axis_off()
    handles = [Patch(color=np.asarray(c) / 255, label=f"{i} {n}") for i, (n, c) in
               enumerate(zip(meta.class_names, meta.palette))]
    handles.append(Patch(facecolor=np.asarray(VOID_COLOR) / 255, edgecolor="0.5", label="255 void"))
    fig.legend(handles=handles, loc="lower center", ncol=6, fontsize=7, frameon=False)
    fig.suptitle("Embedded Fashion-MNIST benchmark: 64 x 64 scenes and their masks", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
