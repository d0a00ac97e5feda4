"""The embedded benchmark: Fashion-MNIST objects composed into small segmentation scenes.

It gives the toolkit a real, class-incremental segmentation benchmark that needs no download
beyond Fashion-MNIST (Debian package ``dataset-fashion-mnist``) and trains on a CPU in minutes.
Each scene has 1-3 objects of uniformly drawn classes (the 10 Fashion-MNIST classes are ids
1..10, 0 is background), scaled (0.9x-1.8x of 28 px at 64 x 64), flipped, tinted (a colour around
its class's hue, times the object's intensity) and pasted in order, so later objects occlude earlier ones, on a
cluttered background (a colour gradient, low-frequency colour noise, stripes and a few random
ellipses/rectangles; never Fashion-MNIST objects). An object's mask is its intensity (after a
3 x 3 grayscale closing that fills dark specks) above a threshold; a 1-pixel void (255) ring is
drawn just outside every visible object region, as VOC has. Training scenes use Fashion-MNIST's
training split, validation scenes its test split. Every scene has its own random generator
(:func:`scene_rng`), so scene ``i`` does not depend on how many scenes are generated.

:func:`prepare_embedded` writes the Pascal VOC layout (read by ``build_dataset("embedded", root, split)``)
plus ``ucdseg_embedded.json`` with the generation parameters. Same parameters -> byte-identical files.
"""

from __future__ import annotations

import colorsys
import gzip
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..data.meta import VOID, VOID_COLOR
from .reader import EmbeddedSegmentation

__all__ = ["prepare_embedded", "default_root", "find_fashion_mnist", "load_fashion_mnist", "read_idx", "make_scenes",
           "scene_rng", "BenchmarkExistsError", "PARAMS_FILE", "GENERATOR_VERSION", "FASHION_MNIST_ENV",
           "DEBIAN_FASHION_MNIST"]

PathLike = Union[str, "os.PathLike[str]"]

GENERATOR_VERSION = 2
PARAMS_FILE = "ucdseg_embedded.json"
FASHION_MNIST_ENV = "UCDSEG_FASHION_MNIST"
EMBEDDED_ENV = "UCDSEG_EMBEDDED"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_HOW_TO_GET = ("install the Debian package dataset-fashion-mnist (it puts them in /usr/share/datasets/fashion-mnist), "
               "or download the four IDX files from https://github.com/zalandoresearch/fashion-mnist (data/fashion/), "
               f"then set {FASHION_MNIST_ENV}=DIR (or `ucdseg prepare-embedded --fashion-mnist DIR`)")

# --- scene recipe (changing any of these changes the benchmark: bump GENERATOR_VERSION) ---
# Version 2 (embedded v2): 1-3 larger objects on a less cluttered background, each tinted around
# its class's hue; version 1 had 1-4 objects of 0.7-1.8x, up to 4 background shapes and a tint of
# any hue, on which joint training reached 13 % mIoU (docs/embedded.md, "Why version 2").
MIN_OBJECTS, MAX_OBJECTS = 1, 3
SCALE_RANGE = (0.9, 1.8)  # object side / 28 px, at a 64 px image (scaled with image_size / 64)
MASK_THRESHOLD = 0.10  # object pixel <=> intensity / 255 > this
ALPHA_RANGE = (0.04, 0.16)  # opacity ramps from 0 to 1 over this intensity range (soft edges)
SHADE_FLOOR = 0.25  # object colour = tint * (floor + (1 - floor) * intensity)
HUE_JITTER = 0.1  # an object of Fashion-MNIST label k has a hue in k / 10 +- this (neighbours overlap)
MAX_SHAPES = 2
NOISE_GRID = 5  # low-frequency noise: a 5 x 5 random grid, bilinearly upsampled
PIXEL_NOISE = 0.015
_CHUNK = 256  # scenes per vectorised background batch


class BenchmarkExistsError(FileExistsError, ValueError):
    """The root holds something prepare_embedded must not replace (also a ValueError, for CLIs)."""


# ------------------------------------------------------------------------------ Fashion-MNIST
def default_root() -> Path:
    """Where the embedded benchmark lives by default: ``$UCDSEG_EMBEDDED``, else
    ``$UCDSEG_CACHE/embedded``, else ``~/.cache/ucdseg/embedded``."""
    if os.environ.get(EMBEDDED_ENV):
        return Path(os.environ[EMBEDDED_ENV]).expanduser()
    from ..data.index import default_cache_dir  # $UCDSEG_CACHE, checked

    return default_cache_dir() / "embedded"


def read_idx(path: PathLike) -> np.ndarray:
    """An IDX file (raw or gzip-compressed) of unsigned bytes as a numpy array of its shape."""
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f"cannot read IDX file {path}: {exc}") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or data[3] == 0:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic {data[:4].hex() or 'empty'}, "
                         f"expected 000008 then the number of dimensions)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"IDX file {path} is truncated in its header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    count = int(np.prod(dims, dtype=np.int64))
    if len(data) - header != count:
        raise ValueError(f"IDX file {path} holds {len(data) - header} bytes of data, expected {count} for shape {dims}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _idx_path(folder: Path, stem: str) -> Optional[Path]:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def find_fashion_mnist(directory: Optional[PathLike] = None) -> Path:
    """The folder holding the four Fashion-MNIST IDX files.

    ``directory`` if given, else ``$UCDSEG_FASHION_MNIST``, else Debian's
    ``/usr/share/datasets/fashion-mnist``; a FileNotFoundError says where to get them otherwise.
    """
    if directory is not None:
        folder, source = Path(directory).expanduser(), "the given fashion_mnist_dir"
    elif os.environ.get(FASHION_MNIST_ENV):
        folder, source = Path(os.environ[FASHION_MNIST_ENV]).expanduser(), f"${FASHION_MNIST_ENV}"
    else:
        folder, source = DEBIAN_FASHION_MNIST, "the default location"
    missing = [stem for pair in _FILES.values() for stem in pair if _idx_path(folder, stem) is None]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST IDX files not found in {folder} ({source}): missing "
                                f"{', '.join(m + '[.gz]' for m in missing)}; {_HOW_TO_GET}")
    return folder


def load_fashion_mnist(split: str, directory: Optional[PathLike] = None) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, 28, 28) uint8, labels (N,) uint8)`` of split ``"train"`` or ``"test"``."""
    if split not in _FILES:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}: expected 'train' or 'test'")
    folder = find_fashion_mnist(directory)
    image_file, label_file = (_idx_path(folder, stem) for stem in _FILES[split])
    assert image_file is not None and label_file is not None
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split}: expected images (N, H, W) and labels (N,), got {images.shape} "
                         f"in {image_file} and {labels.shape} in {label_file}")
    if labels.size and labels.max() > 9:
        raise ValueError(f"Fashion-MNIST {split}: labels must be 0..9, found {labels.max()} in {label_file}")
    return images, labels


# ------------------------------------------------------------------------------------ scenes
def _interp_matrix(size: int, grid: int) -> np.ndarray:
    """(size, grid) bilinear interpolation weights from ``grid`` knots to ``size`` pixels."""
    pos = (np.arange(size) + 0.5) / size * (grid - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, grid - 2)
    frac = pos - lo
    m = np.zeros((size, grid), dtype=np.float32)
    m[np.arange(size), lo] = 1 - frac
    m[np.arange(size), lo + 1] = frac
    return m


def _background_params(rng: np.random.Generator) -> np.ndarray:
    """The random numbers of one background, as a flat float32 vector (see :func:`_backgrounds`)."""
    gradient = [rng.uniform(0.05, 0.95, 6), rng.uniform(0, 2 * np.pi, 1)]  # 2 colours, direction
    noise = [rng.normal(0, 0.12, NOISE_GRID * NOISE_GRID * 3)]
    stripes = [rng.uniform(0, 0.12, 1) * (rng.random(1) < 0.6), rng.uniform(3, 10, 1),  # amplitude, frequency
               rng.uniform(0, np.pi, 1), rng.uniform(0, 2 * np.pi, 1)]  # orientation, phase
    count = int(rng.integers(1, MAX_SHAPES + 1))
    shapes = []
    for k in range(MAX_SHAPES):  # centre (2), radii (2), rotation, ellipse?, colour (3), opacity
        shapes += [rng.uniform(0, 1, 2), rng.uniform(0.05, 0.3, 2), rng.uniform(0, np.pi, 1),
                   (rng.random(1) < 0.5).astype(float), rng.uniform(0, 1, 3), rng.uniform(0.35, 0.85, 1) * (k < count)]
    return np.concatenate(gradient + noise + stripes + shapes).astype(np.float32)


def _backgrounds(params: np.ndarray, size: int) -> np.ndarray:
    """Cluttered backgrounds, float32 (n, size, size, 3) in [0, 1], from (n, P) :func:`_background_params`."""
    n = len(params)
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    yy, xx = yy[None], xx[None]  # (1, S, S)

    def take(k: int) -> np.ndarray:
        nonlocal params
        out, params = params[:, :k], params[:, k:]
        return out

    def per_scene(v: np.ndarray) -> np.ndarray:  # (n,) -> (n, 1, 1)
        return v[:, None, None]

    # a linear gradient between two colours, in a random direction
    colors, angle = take(6).reshape(n, 2, 3), take(1)[:, 0]
    cos, sin = per_scene(np.cos(angle)), per_scene(np.sin(angle))
    t = (0.5 + ((xx - 0.5) * cos + (yy - 0.5) * sin) / (np.abs(cos) + np.abs(sin)))[..., None]
    img = colors[:, None, None, 0, :] * (1 - t) + colors[:, None, None, 1, :] * t

    # low-frequency colour noise: a coarse random grid, bilinearly upsampled
    m = _interp_matrix(size, NOISE_GRID)
    grid = take(NOISE_GRID * NOISE_GRID * 3).reshape(n, NOISE_GRID, NOISE_GRID, 3)
    img += np.einsum("ij,njkc,lk->nilc", m, grid, m, optimize=True)

    # stripes (a texture), faint or absent
    amp, freq, phi, phase = take(4).T
    proj = xx * per_scene(np.cos(phi)) + yy * per_scene(np.sin(phi))
    img += (per_scene(amp) * np.sin(2 * np.pi * per_scene(freq) * proj + per_scene(phase)))[..., None]

    # a few solid ellipses / rectangles, rotated, semi-transparent
    for _ in range(MAX_SHAPES):
        cx, cy, rx, ry, rot, ellipse = take(6).T
        color, alpha = take(3), take(1)[:, 0]
        dx, dy = xx - per_scene(cx), yy - per_scene(cy)
        c, s = per_scene(np.cos(rot)), per_scene(np.sin(rot))
        u, v = (dx * c + dy * s) / per_scene(rx), (-dx * s + dy * c) / per_scene(ry)
        inside = np.where(per_scene(ellipse) > 0.5, u * u + v * v <= 1, np.maximum(np.abs(u), np.abs(v)) <= 1)
        img += (inside * per_scene(alpha))[..., None] * (color[:, None, None, :] - img)
    assert params.shape[1] == 0
    return np.clip(img, 0, 1)


def _tint(rng: np.random.Generator, label: int) -> np.ndarray:
    """A saturated, fairly bright colour (RGB in [0, 1]) for an object of Fashion-MNIST ``label``:
    its hue is within ``HUE_JITTER`` of ``label / 10``, so a class has a typical colour (as sky or
    grass do) that it shares in part with its two hue neighbours in label order; the shape tells
    them apart (docs/embedded.md, "Why version 2", says what this makes easier)."""
    h = (label / 10 + rng.uniform(-HUE_JITTER, HUE_JITTER)) % 1.0
    s, v = rng.uniform(0.45, 1.0), rng.uniform(0.7, 1.0)
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32)


def _close(obj: np.ndarray) -> np.ndarray:
    """Grayscale closing (3 x 3 max then min filter) of a uint8 object: fills its dark specks and
    1-2 px cracks, so the silhouette is solid while wide openings (bag handles, legs) stay open."""
    h, w = obj.shape
    padded = np.pad(obj, 1)
    dilated = np.max([padded[i: i + h, j: j + w] for i in range(3) for j in range(3)], axis=0)
    padded = np.pad(dilated, 1, mode="edge")
    return np.min([padded[i: i + h, j: j + w] for i in range(3) for j in range(3)], axis=0)


def _resize(obj: np.ndarray, side: int) -> np.ndarray:
    """A uint8 object resized (bilinear) to side x side, as float32 in [0, 1]."""
    return np.asarray(Image.fromarray(obj).resize((side, side), Image.BILINEAR), dtype=np.float32) / 255.0


def _paste_objects(rng: np.random.Generator, img: np.ndarray, pools: list[np.ndarray], objects: np.ndarray,
                   size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pastes 1-3 objects onto ``img`` (S, S, 3) in place; returns (labels, depth) (S, S) uint8."""
    labels = np.zeros((size, size), dtype=np.uint8)
    depth = np.zeros((size, size), dtype=np.uint8)
    for k in range(int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))):
        cls = int(rng.integers(0, 10))
        pool = pools[cls]
        obj = objects[pool[int(rng.integers(0, len(pool)))]]
        side = max(4, int(round(obj.shape[0] * rng.uniform(*SCALE_RANGE) * size / 64)))
        flip = rng.random() < 0.5
        tint = _tint(rng, cls)
        y0 = int(rng.integers(-side // 4, size - side + side // 4 + 1))
        x0 = int(rng.integers(-side // 4, size - side + side // 4 + 1))

        if flip:
            obj = np.ascontiguousarray(obj[:, ::-1])
        intensity = _resize(obj, side)  # shading (texture)
        shape = _resize(_close(obj), side)  # silhouette: opacity and mask
        ys, xs = slice(max(y0, 0), min(y0 + side, size)), slice(max(x0, 0), min(x0 + side, size))
        crop = (slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0))
        part, opaque = intensity[crop], shape[crop]
        alpha = np.clip((opaque - ALPHA_RANGE[0]) / (ALPHA_RANGE[1] - ALPHA_RANGE[0]), 0, 1)[..., None]
        color = tint * (SHADE_FLOOR + (1 - SHADE_FLOOR) * part[..., None])
        img[ys, xs] = img[ys, xs] * (1 - alpha) + color * alpha
        inside = opaque > MASK_THRESHOLD
        labels[ys, xs][inside] = cls + 1
        depth[ys, xs][inside] = k + 1
    return labels, depth


def _void_ring(labels: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Sets to 255 every pixel with a 4-neighbour of a higher object (a 1-px ring outside each object)."""
    higher = np.zeros(depth.shape, dtype=bool)
    higher[1:] |= depth[:-1] > depth[1:]
    higher[:-1] |= depth[1:] > depth[:-1]
    higher[:, 1:] |= depth[:, :-1] > depth[:, 1:]
    higher[:, :-1] |= depth[:, 1:] > depth[:, :-1]
    out = labels.copy()
    out[higher] = VOID
    return out


def scene_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """The generator of one scene: scene ``index`` of stream ``stream`` (0 train, 1 val) of ``seed``.

    Each scene has its own, so a scene does not depend on how many scenes are generated."""
    return np.random.default_rng([seed, stream, index])


def make_scenes(rngs: Sequence[np.random.Generator], objects: np.ndarray, object_labels: np.ndarray,
                size: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene per generator in ``rngs``, made of the given Fashion-MNIST objects: images
    (n, S, S, 3) uint8 and masks (n, S, S) uint8 (0 background, 1..10 = label + 1, 255 void)."""
    pools = [np.flatnonzero(object_labels == c) for c in range(10)]
    empty = [c for c, p in enumerate(pools) if len(p) == 0]
    if empty:
        raise ValueError(f"Fashion-MNIST objects lack classes {empty}: expected all labels 0..9")
    num = len(rngs)
    images = np.empty((num, size, size, 3), dtype=np.uint8)
    masks = np.empty((num, size, size), dtype=np.uint8)
    for start in range(0, num, _CHUNK):
        chunk = rngs[start: start + _CHUNK]
        batch = _backgrounds(np.stack([_background_params(rng) for rng in chunk]), size)
        for i, rng in enumerate(chunk):
            labels, depth = _paste_objects(rng, batch[i], pools, objects, size)
            masks[start + i] = _void_ring(labels, depth)
            batch[i] += rng.normal(0, PIXEL_NOISE, batch[i].shape).astype(np.float32)
        images[start: start + len(chunk)] = np.clip(np.rint(batch * 255), 0, 255).astype(np.uint8)
    return images, masks


# ------------------------------------------------------------------------------ writing files
def _params(num_train: int, num_val: int, image_size: int, seed: int) -> dict:
    return {"generator_version": GENERATOR_VERSION, "num_train": num_train, "num_val": num_val,
            "image_size": image_size, "seed": seed}


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"prepare_embedded: {name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _read_params(root: Path) -> Optional[dict]:
    try:
        with open(root / PARAMS_FILE, "r", encoding="utf-8") as f:
            info = json.load(f)
        return info.get("params") if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None


def _ids(num_train: int, num_val: int) -> dict[str, list[str]]:
    return {"train": [f"train_{i:06d}" for i in range(num_train)], "val": [f"val_{i:06d}" for i in range(num_val)]}


def _is_complete(root: Path, params: dict) -> bool:
    """True when ``root`` holds every file of the benchmark described by ``params``."""
    if _read_params(root) != params:
        return False
    ids = _ids(params["num_train"], params["num_val"])
    lists = {"train": root / "ImageSets" / "Segmentation" / "train_aug.txt",
             "val": root / "ImageSets" / "Segmentation" / "val.txt"}
    for split, path in lists.items():
        try:
            if path.read_text(encoding="utf-8").split() != ids[split]:
                return False
        except OSError:
            return False
    names = set(os.listdir(root / "JPEGImages")) if (root / "JPEGImages").is_dir() else set()
    aug = set(os.listdir(root / "SegmentationClassAug")) if (root / "SegmentationClassAug").is_dir() else set()
    cls = set(os.listdir(root / "SegmentationClass")) if (root / "SegmentationClass").is_dir() else set()
    every = ids["train"] + ids["val"]
    return (all(f"{i}.jpg" in names and f"{i}.png" in aug for i in every)
            and all(f"{i}.png" in cls for i in ids["val"]))


def _own_files(params: dict) -> set[str]:
    """The relative paths (files and folders) of the benchmark ``params`` describes: the manifest of
    what :func:`prepare_embedded` writes, so it never replaces a folder holding anything else."""
    ids = _ids(params["num_train"], params["num_val"])
    own = {"JPEGImages", "SegmentationClassAug", "SegmentationClass", "ImageSets", "ImageSets/Segmentation",
           "ImageSets/Segmentation/train_aug.txt", "ImageSets/Segmentation/val.txt", PARAMS_FILE}
    for i in ids["train"] + ids["val"]:
        own |= {f"JPEGImages/{i}.jpg", f"SegmentationClassAug/{i}.png"}
    own |= {f"SegmentationClass/{i}.png" for i in ids["val"]}
    own |= {"saliency_map", "saliency_map/VERSION"} | {f"saliency_map/{i}.png" for i in ids["train"]}  # .saliency
    return own


def _foreign_files(root: Path, params: dict) -> list[str]:
    """What ``root`` holds that the benchmark of ``params`` does not (a user's files)."""
    own = _own_files(params)
    foreign = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel not in own and not any(rel.startswith(f + "/") for f in foreign):
            foreign.append(rel)
    return foreign


def _palette_bytes() -> list[int]:
    flat = np.zeros((256, 3), dtype=np.uint8)
    flat[: EmbeddedSegmentation.meta.num_classes] = np.asarray(EmbeddedSegmentation.meta.palette, dtype=np.uint8)
    flat[VOID] = VOID_COLOR
    return flat.ravel().tolist()


def _write_split(folder: Path, ids: list[str], images: np.ndarray, masks: np.ndarray, val: bool) -> None:
    palette = _palette_bytes()
    for name, image, mask in zip(ids, images, masks):
        Image.fromarray(image).save(folder / "JPEGImages" / f"{name}.jpg", quality=95)
        png = Image.fromarray(mask)
        png.putpalette(palette)
        png.save(folder / "SegmentationClassAug" / f"{name}.png")
        if val:
            png.save(folder / "SegmentationClass" / f"{name}.png")


def _generate(folder: Path, params: dict, fashion_mnist_dir: Optional[PathLike], progress: bool) -> None:
    """Writes the whole benchmark into the (empty) ``folder``."""
    for sub in ("JPEGImages", "SegmentationClassAug", "SegmentationClass", "ImageSets/Segmentation"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    ids = _ids(params["num_train"], params["num_val"])
    size = params["image_size"]
    with tqdm(total=len(ids["train"]) + len(ids["val"]), desc="generating the embedded benchmark", unit="scene",
              disable=not progress, dynamic_ncols=True) as bar:
        for split, source, stream in (("train", "train", 0), ("val", "test", 1)):
            objects, labels = load_fashion_mnist(source, fashion_mnist_dir)
            for start in range(0, len(ids[split]), _CHUNK):  # (chunking does not change any scene)
                names = ids[split][start: start + _CHUNK]
                rngs = [scene_rng(params["seed"], stream, start + i) for i in range(len(names))]
                images, masks = make_scenes(rngs, objects, labels, size)
                _write_split(folder, names, images, masks, split == "val")
                bar.update(len(names))
    lists = folder / "ImageSets" / "Segmentation"
    (lists / "train_aug.txt").write_text("".join(f"{i}\n" for i in ids["train"]), encoding="utf-8")
    (lists / "val.txt").write_text("".join(f"{i}\n" for i in ids["val"]), encoding="utf-8")
    info = {
        "name": "ucdseg embedded Fashion-MNIST benchmark",
        "params": params,
        "class_names": list(EmbeddedSegmentation.meta.class_names),
        "objects_per_scene": [MIN_OBJECTS, MAX_OBJECTS],
        "object_scale": list(SCALE_RANGE),
        "mask_threshold": MASK_THRESHOLD,
        "source": {"train": "Fashion-MNIST training split", "val": "Fashion-MNIST test split (t10k)"},
        "layout": "Pascal VOC: JPEGImages/, SegmentationClassAug/, SegmentationClass/ (val), "
                  "ImageSets/Segmentation/{train_aug,val}.txt",
    }
    (folder / PARAMS_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def prepare_embedded(root: PathLike, num_train: int = 2000, num_val: int = 400, image_size: int = 64, seed: int = 0,
                     fashion_mnist_dir: Optional[PathLike] = None, progress: bool = True,
                     overwrite: bool = False) -> Path:
    """Generates the embedded benchmark in ``root`` (VOC layout) and returns ``root``.

    Returns at once when ``root`` already holds a complete benchmark with the same parameters.
    A benchmark with other parameters is replaced only with ``overwrite=True``; a non-empty folder
    that is not an embedded benchmark is never written into. The files are generated in a
    temporary folder next to ``root`` and moved into place at the end, so ``root`` is never
    half-written. Fashion-MNIST is looked up as in :func:`find_fashion_mnist`.
    """
    params = _params(_check_int("num_train", num_train, 1), _check_int("num_val", num_val, 1),
                     _check_int("image_size", image_size, 16), _check_int("seed", seed, 0))
    root = Path(root).expanduser().absolute()
    if root.exists() and not root.is_dir():
        raise BenchmarkExistsError(f"prepare_embedded: {root} exists and is not a folder")
    replace = False
    if root.is_dir() and any(root.iterdir()):
        existing = _read_params(root)
        if existing is None:
            raise BenchmarkExistsError(f"prepare_embedded: {root} is not empty and holds no {PARAMS_FILE}; "
                                       f"refusing to write into it: give an empty or new folder")
        if existing == params and _is_complete(root, params):
            return root
        if existing != params and not overwrite:
            diff = ", ".join(f"{k}={existing.get(k)!r} (asked {v!r})" for k, v in params.items()
                             if existing.get(k) != v)
            raise BenchmarkExistsError(f"prepare_embedded: {root} holds an embedded benchmark with other "
                                       f"parameters: {diff}; choose another folder (data.root=DIR, or `ucdseg "
                                       f"prepare-embedded --root DIR`), or delete {root} to regenerate it there")
        # other parameters with overwrite=True, or an incomplete copy of ours: replaced only when
        # it holds nothing but the files of a benchmark (never a user's own files)
        foreign = sorted(set(_foreign_files(root, existing)) & set(_foreign_files(root, params)))
        if foreign:
            more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            raise BenchmarkExistsError(f"prepare_embedded: {root} is an incomplete embedded benchmark that also holds "
                                       f"files it did not write ({', '.join(foreign[:3])}{more}); nothing was changed: "
                                       f"move those files out or use another folder")
        replace = True
    find_fashion_mnist(fashion_mnist_dir)  # fail early, before any file is written
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        _generate(tmp, params, fashion_mnist_dir, progress)
        os.chmod(tmp, 0o755)
        if replace:
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.replace(root, old / "benchmark")
            os.replace(tmp, root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, root)  # also replaces an empty folder
            except OSError:
                if _is_complete(root, params):  # another process finished first
                    return root
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
