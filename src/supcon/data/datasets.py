"""Datasets in a registry. Each entry yields uint8 images [N, H, W, 3], int64 labels and class names
(or, for a multi-label CSV manifest, float32 multi-hot labels [N, C]: see
:mod:`supcon.evaluation.multilabel`).

Images stay uint8 (4x smaller than float32) and batches are built by indexing the whole tensor;
conversion to float and augmentation happen per batch on the training device.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import torch

from supcon.core.config import DataConfig
from supcon.core.errors import UsageError
from supcon.core.registry import DATASETS, register_dataset
from supcon.data.dataset import PHOTO_SIZE, ImageDataset, Normalize, Split
from supcon.data.imageset import take
from supcon.data.labels import random_split
from supcon.data.longtail import long_tailed


def _from_arrays(name, x_train, y_train, x_test, y_test, classes) -> ImageDataset:
    ds = ImageDataset(
        name=name,
        train_x=torch.from_numpy(np.ascontiguousarray(x_train, dtype=np.uint8)),
        train_y=_labels(y_train),
        test_x=torch.from_numpy(np.ascontiguousarray(x_test, dtype=np.uint8)),
        test_y=_labels(y_test),
        classes=list(classes),
    )
    if ds.num_classes < 2:
        raise UsageError(f"dataset {name!r} has {ds.num_classes} class; at least 2 are needed")
    return ds


def _labels(y) -> torch.Tensor:
    """Class ids [N] as int64; multi-hot labels [N, C] as float32."""
    return torch.from_numpy(np.asarray(y, dtype=np.float32 if np.ndim(y) == 2 else np.int64))


@register_dataset("digits")
def load_digits(image_size: int | None = None, seed: int = 0) -> ImageDataset:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images; works offline).

    Shown at 16x16 by default (nearest-neighbour, each pixel doubled): the Keras example's CNN needs at
    least 10x10 pixels for its two valid convolutions and poolings. The train/test split is
    stratified and fixed by ``seed``.
    """
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    bunch = _load()
    x = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # [N, 8, 8] in 0..255
    size = image_size or 16
    if size % 8:
        raise UsageError(f"digits can be shown at multiples of 8 pixels, got --image-size {size}")
    x = x.repeat(size // 8, axis=1).repeat(size // 8, axis=2)
    x = np.repeat(x[..., None], 3, axis=3)
    y = bunch.target.astype(np.int64)
    # Its own fixed share: data.test_fraction is for image files given without a split.
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    made = f"8x8 greyscale scans, each pixel repeated {size // 8}x{size // 8} and to 3 channels"
    return _from_arrays("digits", x_tr, y_tr, x_te, y_te, [str(c) for c in bunch.target_names]) | {
        "made_from": made
    }


def _cifar(name: str, path: str | None, progress: bool = True) -> ImageDataset:
    from supcon.data.download import load_cifar

    return _from_arrays(name, *load_cifar(name, path=Path(path) if path else None, progress=progress))


@register_dataset("cifar10")
def load_cifar10(path: str | None = None, progress: bool = True) -> ImageDataset:
    """CIFAR-10, official python-format archive: downloaded (checksum-verified) or an extracted copy."""
    return _cifar("cifar10", path, progress)


@register_dataset("cifar100")
def load_cifar100(path: str | None = None, progress: bool = True) -> ImageDataset:
    """CIFAR-100 (fine labels), official python-format archive: downloaded or an extracted copy."""
    return _cifar("cifar100", path, progress)


@register_dataset("cifar10-lt")
def load_cifar10_lt(
    imbalance: float | None = None, path: str | None = None, progress: bool = True
) -> ImageDataset:
    """CIFAR-10-LT (Cao et al. 2019): CIFAR-10's training set cut to the exponential profile, max/min =
    ``imbalance`` (default 100); the test set stays balanced. See :mod:`supcon.data.longtail`."""
    return long_tailed(load_cifar10(path, progress), imbalance, "cifar10-lt")


@register_dataset("cifar100-lt")
def load_cifar100_lt(
    imbalance: float | None = None, path: str | None = None, progress: bool = True
) -> ImageDataset:
    """CIFAR-100-LT: as CIFAR-10-LT, over CIFAR-100's 100 classes."""
    return long_tailed(load_cifar100(path, progress), imbalance, "cifar100-lt")


@register_dataset("imagefolder")
def load_folder(
    path: str | None = None,
    image_size: int | None = None,
    progress: bool = True,
    store: str = "auto",
    test_fraction: float = 0.2,
) -> ImageDataset:
    """Image files: ``PATH/train/<class>/*`` and ``PATH/test/<class>/*``, ``PATH/<class>/*`` (split by
    ``test_fraction``) or a CSV manifest (see :mod:`supcon.data.manifest`).

    Held in memory as square ``image_size`` arrays, or, with ``store="disk"`` (``"auto"``: from 64 px
    on), memory-mapped from an on-disk store at their own aspect ratio (see :mod:`supcon.data.store`).
    Decoded once either way; both caches live outside PATH.
    """
    from supcon.data.imagefolder import decode_files
    from supcon.data.manifest import read_manifest

    if not path:
        raise UsageError("dataset 'imagefolder' needs --data PATH")
    m = read_manifest(path, test_fraction)
    name = m.root.stem if m.root.is_file() else (m.root.name or "imagefolder")
    paths = {"train_paths": [f[0] for f in m.train], "test_paths": [f[0] for f in m.test]}
    if use_store(store, image_size):
        return _stored(name, m, image_size, progress) | paths
    # The decode cache keeps pixels and class ids; multi-hot labels come from the manifest itself.
    ids = (np.zeros(len(m.train), np.int64), np.zeros(len(m.test), np.int64)) if m.multilabel else None
    y_train, y_test = ids or (m.train_y, m.test_y)
    x_train, _, x_test, _, classes = decode_files(
        m.root, m.classes, m.train, y_train, m.test, y_test, image_size=image_size, progress=progress
    )
    return _from_arrays(name, x_train, m.train_y, x_test, m.test_y, classes) | paths


def use_store(store: str, image_size: int | None) -> bool:
    """Whether image files go to the on-disk store (``data.store``; auto: training at 64 px or more)."""
    if store == "disk" and image_size is None:
        raise UsageError("data.store=disk needs --image-size (the size images are trained at)")
    return store == "disk" or (store == "auto" and image_size is not None and image_size >= PHOTO_SIZE)


def _stored(name: str, m, image_size: int, progress: bool) -> ImageDataset:
    from supcon.data.imageset import StoredImages, storage_side
    from supcon.data.store import open_store

    st = open_store(m, storage_side(image_size), progress=progress)
    n = len(m.train)
    ds = ImageDataset(
        name=name,
        train_x=StoredImages(st, np.arange(n), image_size),
        train_y=torch.from_numpy(m.train_y),
        test_x=StoredImages(st, np.arange(n, n + len(m.test)), image_size),
        test_y=torch.from_numpy(m.test_y),
        classes=list(m.classes),
    )
    return ds


def _looks_like_cifar(path: Path) -> str | None:
    for name, marker in (("cifar10", "batches.meta"), ("cifar100", "meta")):
        for folder in (path, path / "cifar-10-batches-py", path / "cifar-100-python"):
            if (folder / marker).is_file() and (folder / "test_batch").exists() == (name == "cifar10"):
                return name
    if path.is_file() and path.name.startswith("cifar-10-python"):
        return "cifar10"
    if path.is_file() and path.name.startswith("cifar-100-python"):
        return "cifar100"
    return None


# Loader arguments that a loader may not take without a user having asked for anything: the loop's
# own (seed, progress) and the long-tail cut, which load_split applies to any dataset itself.
_ALWAYS_PASSED = ("seed", "progress", "imbalance")
# What the other arguments are called in the config, for the one-line refusal.
_CONFIG_KEYS = {
    "path": "data.path (--data)",
    "image_size": "data.image_size (--image-size)",
    "store": "data.store",
    "test_fraction": "data.test_fraction (--test-fraction)",
}


def load_dataset(
    name: str | None = None, path: str | None = None, *, if_supported: dict | None = None, **kwargs
) -> ImageDataset:
    """Load by registry name, or by ``path``: an image folder or an official CIFAR copy, recognised by
    its files. An argument the dataset cannot honour (``image_size`` for CIFAR's fixed 32 px, a
    ``path`` for the bundled digits) is refused in one line when it asks for anything but the default;
    ``if_supported`` arguments go only to loaders that take them (the caller checks the result)."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.exists():
            raise UsageError(f"data path does not exist: {p}")
        if name is None:
            name = _looks_like_cifar(p) or "imagefolder"
        kwargs["path"] = str(p)
    name = name or "digits"
    loader = DATASETS.get(name)
    takes = inspect.signature(loader).parameters
    extra = {k: v for k, v in (if_supported or {}).items() if k in takes}
    return loader(**_arguments_for(name, takes, kwargs), **extra)


def _arguments_for(name: str, takes, kwargs: dict) -> dict:
    for key, value in kwargs.items():
        if key in takes or key in _ALWAYS_PASSED:
            continue
        if value != getattr(DataConfig(), key, None):
            what = _CONFIG_KEYS.get(key, key)
            raise UsageError(f"{what} does not apply to dataset {name!r}; leave it unset for {name}")
    return {k: v for k, v in kwargs.items() if k in takes}


def split_validation(
    x: torch.Tensor, y: torch.Tensor, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Carve a stratified validation split from the training set (for model selection; the test set is
    touched once, at the end). Multi-label ``y [N, C]``: a seeded random split (not stratified)."""
    if fraction <= 0:
        return x, y, x[:0], y[:0]
    if y.dim() == 2:
        val = torch.from_numpy(random_split(len(y), fraction, seed))
    else:
        g = torch.Generator().manual_seed(seed)
        val_idx = []
        for c in torch.unique(y):
            idx = torch.nonzero(y == c).flatten()
            idx = idx[torch.randperm(len(idx), generator=g)]
            val_idx.append(idx[: max(1, round(len(idx) * fraction))])
        val = torch.cat(val_idx).sort().values
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[val] = False
    if not bool(keep.any()):
        raise UsageError(
            f"data.val_fraction={fraction} leaves no training images ({len(y)} in all); use a smaller share"
        )
    return take(x, keep), y[keep], take(x, val), y[val]


def channel_stats(images, sample: int = 4096) -> Normalize:
    """Per-channel mean/std (in [0, 1] units) of uint8 images [N, H, W, C]; of a seeded sample of
    ``sample`` images' evaluation views for stored images (reading every file would take minutes)."""
    if not isinstance(images, torch.Tensor):
        pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:sample]
        images = images[pick.sort().values]
    x = images.reshape(-1, images.shape[-1])
    mean = torch.zeros(x.shape[1], dtype=torch.float64)
    sq = torch.zeros(x.shape[1], dtype=torch.float64)
    for i in range(0, len(x), 1 << 22):  # chunks keep the float copy small
        c = x[i : i + (1 << 22)].double() / 255.0
        mean += c.sum(0)
        sq += c.square().sum(0)
    mean /= len(x)
    std = (sq / len(x) - mean.square()).clamp_min(1e-12).sqrt()
    return Normalize(tuple(mean.tolist()), tuple(std.tolist()))


def _select(data: ImageDataset, train: torch.Tensor, test: torch.Tensor) -> ImageDataset:
    """The images of ``data`` where the boolean masks ``train`` [N_train] and ``test`` [N_test] are set."""
    from dataclasses import replace

    def pick(paths, mask):
        return None if paths is None else [p for p, m in zip(paths, mask.tolist(), strict=True) if m]

    return replace(
        data, train_x=take(data.train_x, train), train_y=data.train_y[train], test_x=take(data.test_x, test),
        test_y=data.test_y[test], train_paths=pick(data.train_paths, train),
        test_paths=pick(data.test_paths, test), held_out=None,
    )  # fmt: skip


def exclude_classes(data: ImageDataset, names: list[str | int] | None) -> ImageDataset:
    """``data`` without the images of ``names`` (class names, else ids), which move to
    ``held_out``: no phase trains on them, evaluation retrieves them (open-set retrieval)."""
    if not names:
        return data
    ids = {str(i): i for i in range(data.num_classes)} | {str(c): i for i, c in enumerate(data.classes)}
    unknown = [n for n in names if str(n) not in ids]
    if unknown:
        raise UsageError(
            f"data.exclude_classes: unknown {unknown}; the classes are: {', '.join(data.classes)}"
        )
    out = torch.tensor(sorted({ids[str(n)] for n in names}))
    if data.num_classes - len(out) < 2:
        raise UsageError(f"data.exclude_classes leaves {data.num_classes - len(out)} class; 2 must train")
    held_train, held_test = torch.isin(data.train_y, out), torch.isin(data.test_y, out)
    kept = _select(data, ~held_train, ~held_test)
    kept.held_out = _select(data, held_train, held_test)
    return kept


def load_split(data_cfg, seed: int, progress: bool = True) -> tuple[ImageDataset, Split]:
    """The dataset of a run and its train/validation split (``data_cfg``: a ``config.DataConfig``).

    With ``normalize``, the training split's channel statistics become the dataset's ``norm``. Under
    torchrun the first process of each machine loads (downloads, decodes, caches) first and the
    others then read its cache: one download and one decode per machine, and no process removes
    files another is reading.
    """
    from supcon.core import dist

    d = data_cfg
    with dist.local_main_first():
        data = load_dataset(
            d.dataset, d.path, image_size=d.image_size, seed=seed, progress=progress, store=d.store,
            test_fraction=d.test_fraction, imbalance=d.imbalance,
        )  # fmt: skip
    if d.imbalance is not None and d.dataset not in ("cifar10-lt", "cifar100-lt"):  # those cut their own
        data = long_tailed(data, d.imbalance)
    data = exclude_classes(data, d.exclude_classes)
    split = Split(*split_validation(data.train_x, data.train_y, d.val_fraction, seed))
    if d.normalize:
        data.norm = channel_stats(split.train_x)
        if data.held_out is not None:
            data.held_out.norm = data.norm
    return data, split
