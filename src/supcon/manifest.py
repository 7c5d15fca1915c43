"""What a dataset of image files is: every file with its class and split, from one of three layouts.

- ``PATH/train/<class>/*`` and ``PATH/test/<class>/*``: the splits as given.
- ``PATH/<class>/*``: split into train and test by a seeded stratified split (``test_fraction``).
- ``FILE.csv`` with a header ``path,label[,split]``: paths relative to the CSV file; a split of
  ``train`` or ``test`` per row (an empty one trains), or, when no row gives one, the same
  stratified split.

Label ``i`` is ``classes[i]``, the sorted class names. Each file carries its size and modification
time, which key the decode caches: an added, removed or rewritten image means a fresh decode.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from supcon.errors import UsageError
from supcon.imagefolder import (
    IMAGE_EXTENSIONS,
    _classes,
    _File,
    _flat,
    _labels,
    _list_class,
    _subfolders,
    check_root,
)

# The split of data given without one does not depend on the run's seed: runs that differ only by
# seed are tested on the same images.
SPLIT_SEED = 0
_SHOW = 5  # names listed in an error about many files


@dataclass
class Manifest:
    root: Path  # the folder, or the CSV file
    classes: list[str]
    train: list[_File]
    train_y: np.ndarray  # int64 [N_train]
    test: list[_File]
    test_y: np.ndarray

    def files(self) -> list[_File]:
        return self.train + self.test


def read_manifest(path: str | os.PathLike[str], test_fraction: float = 0.2) -> Manifest:
    """The manifest of a data folder or CSV file (see the module docstring for the layouts)."""
    root = check_root(path)
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise UsageError(f"data path {root} is a file but not a .csv manifest (path,label[,split])")
        return _from_csv(root, test_fraction)
    if (root / "train").is_dir() or (root / "test").is_dir():
        classes = _classes(root)
        train = [_list_class(root, "train", c) for c in classes]
        test = [_list_class(root, "test", c) for c in classes]
        return Manifest(root, classes, _flat(train), _labels(train), _flat(test), _labels(test))
    classes = _subfolders(root)
    if len(classes) < 2:
        raise UsageError(
            f"data folder {root} needs 2 or more class folders ({root}/<class>/<image>), "
            f"or {root}/train/<class>/ and {root}/test/<class>/; found {len(classes)}"
        )
    per_class = [[(p, rel.lstrip("/"), n, t) for p, rel, n, t in _list_class(root, "", c)] for c in classes]
    files, labels = _flat(per_class), _labels(per_class)
    return _split(root, classes, files, labels, [None] * len(files), test_fraction)


def _split(root, classes, files, labels, given, test_fraction: float) -> Manifest:
    """Files with a given split keep it (and then files without one train); with no split given at
    all, each class sends ``test_fraction`` of its files (at least one) to test."""
    labels = np.asarray(labels, dtype=np.int64)
    is_test = np.array([g == "test" for g in given], dtype=bool)
    free = np.array([g is None for g in given], dtype=bool)
    if not free.all():
        free[:] = False
    rng = np.random.default_rng(SPLIT_SEED)
    for c in range(len(classes)):
        idx = np.flatnonzero(free & (labels == c))
        if len(idx) < 2:
            continue  # a single image trains
        n_test = min(len(idx) - 1, max(1, round(len(idx) * test_fraction)))
        is_test[rng.permutation(idx)[:n_test]] = True
    train_i, test_i = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    if not len(test_i):
        raise UsageError(f"{root}: no test images (every class has a single image, or all rows say train)")
    return Manifest(
        root,
        classes,
        [files[i] for i in train_i],
        labels[train_i],
        [files[i] for i in test_i],
        labels[test_i],
    )


def _from_csv(csv_path: Path, test_fraction: float) -> Manifest:
    rows = _csv_rows(csv_path)
    base = csv_path.parent
    classes = sorted({label for _, label, _, _ in rows})
    if len(classes) < 2:
        raise UsageError(f"{csv_path}: needs 2 or more distinct labels, found {len(classes)}")
    ids = {c: i for i, c in enumerate(classes)}
    files, labels, given, missing = [], [], [], []
    for line, (rel, label, split, _) in enumerate(rows, start=2):
        full = base / rel
        try:
            st = os.stat(full)
        except OSError:
            missing.append(f"{rel} (line {line})")
            continue
        files.append((str(full), rel, st.st_size, st.st_mtime_ns))
        labels.append(ids[label])
        given.append(split)
    if missing:
        more = f" and {len(missing) - _SHOW} more" if len(missing) > _SHOW else ""
        raise UsageError(
            f"{csv_path}: {len(missing)} listed image(s) do not exist: {', '.join(missing[:_SHOW])}{more}"
        )
    return _split(csv_path, classes, files, labels, given, test_fraction)


def _csv_rows(csv_path: Path) -> list[tuple[str, str, str | None, int]]:
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in reader.fieldnames or []]
            lacking = [c for c in ("path", "label") if c not in header]
            if lacking:
                raise UsageError(
                    f"{csv_path}: missing column(s) {', '.join(lacking)}; the header must be "
                    f"path,label[,split] (found: {','.join(header) or 'nothing'})"
                )
            rows = []
            for line, raw in enumerate(reader, start=2):
                row = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
                rows.append(_csv_row(csv_path, line, row))
    except OSError as e:
        raise UsageError(f"cannot read {csv_path}: {e.strerror or e}") from None
    except (csv.Error, UnicodeDecodeError) as e:
        raise UsageError(f"{csv_path}: not a readable CSV file ({e})") from None
    if not rows:
        raise UsageError(f"{csv_path}: no rows under the header")
    return rows


def _csv_row(csv_path: Path, line: int, row: dict) -> tuple[str, str, str | None, int]:
    rel, label, split = row.get("path", ""), row.get("label", ""), row.get("split") or None
    if not rel or not label:
        what = "path" if not rel else "label"
        raise UsageError(f"{csv_path}, line {line}: empty {what}")
    if not rel.lower().endswith(IMAGE_EXTENSIONS):
        raise UsageError(
            f"{csv_path}, line {line}: {rel} is not an image file ({' '.join(IMAGE_EXTENSIONS)})"
        )
    if split not in (None, "train", "test"):
        raise UsageError(f"{csv_path}, line {line}: split must be train or test (or empty), got {split!r}")
    return rel, label, split, line
