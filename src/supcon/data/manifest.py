"""What a dataset of image files is: every file with its class and split, from one of three layouts.

- ``PATH/train/<class>/*`` and ``PATH/test/<class>/*``: the splits as given.
- ``PATH/<class>/*``: split into train and test by a seeded stratified split (``test_fraction``).
- ``FILE.csv`` with a header ``path,label[,split]``: paths relative to the CSV file; a split of
  ``train`` or ``test`` per row (an empty one trains), or, when no row gives one, the same
  stratified split.
- ``FILE.csv`` with a header ``path,labels[,split]``: multi-label, ``labels`` the ``;``-separated
  class names of the image (``dog;grass``). The labels are multi-hot ``[N, C]`` over the sorted union
  of the names. Without a split a seeded random one (a stratified split is not defined when an
  image is in several classes), after which any test image carrying a class that no training image
  has moves to training; with given splits such a class is refused.

Label ``i`` is ``classes[i]``, the sorted class names. Each file carries its size and modification
time, which key the decode caches: an added, removed or rewritten image means a fresh decode.
"""

from __future__ import annotations

import csv
import io
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from supcon.core.errors import UsageError
from supcon.data.diskio import kind, one_line, open_regular, printable, same_files
from supcon.data.files import (
    IMAGE_EXTENSIONS,
    ImageFile,
    check_root,
    class_folders,
    class_labels,
    flatten,
    list_class,
    subfolders,
)

# The split of data given without one does not depend on the run's seed: runs that differ only by
# seed are tested on the same images.
SPLIT_SEED = 0
_SHOW = 5  # names listed in an error about many files


@dataclass
class Manifest:
    root: Path  # the folder, or the CSV file
    classes: list[str]
    train: list[ImageFile]
    train_y: np.ndarray  # int64 [N_train], or float32 multi-hot [N_train, C] (a labels column)
    test: list[ImageFile]
    test_y: np.ndarray

    def files(self) -> list[ImageFile]:
        return self.train + self.test

    @property
    def multilabel(self) -> bool:
        return self.train_y.ndim == 2


def read_manifest(path: str | os.PathLike[str], test_fraction: float = 0.2) -> Manifest:
    """The manifest of a data folder or CSV file (see the module docstring for the layouts)."""
    root = check_root(path)
    if not root.is_dir():  # a file, or a FIFO or device named like one (refused when opened)
        if root.suffix.lower() != ".csv":
            what = "a file" if root.is_file() else _kind_of(root)
            raise UsageError(
                f"data path {root} is {what} but not a .csv manifest "
                "(path,label[,split] or path,labels[,split]) or a folder"
            )
        return _from_csv(root, test_fraction)
    if (root / "train").is_dir() or (root / "test").is_dir():
        classes = class_folders(root)
        train = [list_class(root, "train", c) for c in classes]
        test = [list_class(root, "test", c) for c in classes]
        m = Manifest(root, classes, flatten(train), class_labels(train), flatten(test), class_labels(test))
        split = [False] * len(m.train) + [True] * len(m.test)
        refuse_shared_files(
            root, classes, m.files(), np.concatenate([m.train_y, m.test_y]), split, _rels(m.files())
        )
        return m
    classes = subfolders(root)
    if len(classes) < 2:
        raise UsageError(
            f"data folder {root} needs 2 or more class folders ({root}/<class>/<image>), "
            f"or {root}/train/<class>/ and {root}/test/<class>/; found {len(classes)}"
        )
    per_class = [[(p, rel.lstrip("/"), n, t) for p, rel, n, t in list_class(root, "", c)] for c in classes]
    files, labels = flatten(per_class), class_labels(per_class)
    return _split(root, classes, files, labels, [None] * len(files), test_fraction, _rels(files))


def _kind_of(path: Path) -> str:
    try:
        return kind(os.stat(path).st_mode)
    except OSError as e:
        return f"unreadable ({e.strerror or e})"


def _rels(files: list[ImageFile]) -> list[str]:
    return [f[1] for f in files]


def _split(root, classes, files, labels, given, test_fraction: float, where: list[str]) -> Manifest:
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
    refuse_shared_files(root, classes, files, labels, is_test, where)
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
    rows, multi = _csv_rows(csv_path)
    if multi:
        return _from_multilabel_csv(csv_path, rows, test_fraction)
    classes = sorted({label for _, label, _, _ in rows})
    if len(classes) < 2:
        raise UsageError(f"{csv_path}: needs 2 or more distinct labels, found {len(classes)}")
    ids = {c: i for i, c in enumerate(classes)}
    files = _stat_files(csv_path, rows)
    labels = [ids[label] for _, label, _, _ in rows]
    given = [split for _, _, split, _ in rows]
    return _split(csv_path, classes, files, labels, given, test_fraction, _lines(rows))


def _lines(rows) -> list[str]:
    return [f"{printable(rel)} (line {line})" for rel, _, _, line in rows]


def _stat_files(csv_path: Path, rows) -> list[ImageFile]:
    """The listed files (absolute path, relative path, size, mtime); missing ones refused together,
    then anything but regular files (a FIFO would block the decode forever, a device never end)."""
    base = csv_path.parent
    files, missing, special = [], [], []
    for rel, _, _, line in rows:
        full = base / rel
        try:
            st = os.stat(full)
        except OSError:
            missing.append(f"{printable(rel)} (line {line})")
            continue
        if not stat.S_ISREG(st.st_mode):
            special.append(f"{printable(rel)} (line {line}: {kind(st.st_mode)})")
        files.append((str(full), rel, st.st_size, st.st_mtime_ns))
    for bad, what in ((missing, "do not exist"), (special, "are not regular files")):
        if bad:
            more = f" and {len(bad) - _SHOW} more" if len(bad) > _SHOW else ""
            raise UsageError(f"{csv_path}: {len(bad)} listed path(s) {what}: {', '.join(bad[:_SHOW])}{more}")
    return files


def refuse_shared_files(source: Path, classes, files: list[ImageFile], labels, is_test, where) -> None:
    """Refuse one file on disk (the same path twice, a link, a hard link) listed in both train and
    test, where the test would score images the model trained on (retrieval P@1 = 1.0), or under
    two different labels, which cannot both be its class. ``where[i]`` names entry ``i``."""
    labels, is_test = np.asarray(labels), np.asarray(is_test, dtype=bool)
    for group in same_files(files):
        train = [i for i in group if not is_test[i]]
        test = [i for i in group if is_test[i]]
        if train and test:
            i, j = train[0], test[0]
            raise UsageError(
                f"{source}: {where[i]} (train) and {where[j]} (test) are the same file "
                f"{printable(files[i][0])}; in both splits, the test would score its own training images"
            )
        first = group[0]
        other = next((j for j in group if not np.array_equal(labels[j], labels[first])), None)
        if other is not None:
            raise UsageError(
                f"{source}: {where[first]} ({_names(classes, labels[first])}) and {where[other]} "
                f"({_names(classes, labels[other])}) are the same file {printable(files[first][0])} under "
                "different labels; list each image once" + (" with all its labels" * (labels.ndim == 2))
            )


def _names(classes, label) -> str:
    label = np.asarray(label)
    if label.ndim == 0:
        return repr(printable(classes[int(label)]))
    return printable(";".join(classes[c] for c in np.flatnonzero(label > 0))) or "no labels"


def _from_multilabel_csv(csv_path: Path, rows, test_fraction: float) -> Manifest:
    """A ``path,labels[,split]`` manifest: multi-hot labels over the sorted union of the names."""
    sets = [_label_set(csv_path, line, raw) for _, raw, _, line in rows]
    classes = sorted(set().union(*sets))
    if len(classes) < 2:
        raise UsageError(f"{csv_path}: needs 2 or more distinct labels, found {len(classes)}")
    ids = {c: i for i, c in enumerate(classes)}
    hot = np.zeros((len(rows), len(classes)), np.float32)
    for n, names in enumerate(sets):
        hot[n, [ids[c] for c in names]] = 1.0
    files = _stat_files(csv_path, rows)
    given = [split for _, _, split, _ in rows]
    if all(g is None for g in given):
        is_test = _random_test_rows(hot, test_fraction)
    else:
        is_test = np.array([g == "test" for g in given], dtype=bool)
        unseen = hot[is_test].any(0) & ~hot[~is_test].any(0)
        if unseen.any():
            c = int(np.flatnonzero(unseen)[0])
            line = rows[int(np.flatnonzero(is_test & (hot[:, c] > 0))[0])][3]
            raise UsageError(
                f"{csv_path}, line {line}: label {classes[c]!r} of a test image has no training image"
            )
    refuse_shared_files(csv_path, classes, files, hot, is_test, _lines(rows))
    train_i, test_i = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    if not len(test_i):
        raise UsageError(f"{csv_path}: no test images (all rows say train, or too few rows to split)")
    return Manifest(
        csv_path, classes, [files[i] for i in train_i], hot[train_i], [files[i] for i in test_i], hot[test_i]
    )


def _label_set(csv_path: Path, line: int, raw: str) -> set[str]:
    names = {name.strip() for name in raw.split(";")} - {""}
    if not names:
        raise UsageError(f"{csv_path}, line {line}: no labels (labels is a ;-separated list of class names)")
    return names


def _random_test_rows(hot: np.ndarray, test_fraction: float) -> np.ndarray:
    """Test rows of a seeded random split (``test_fraction`` of the rows, at least one if there are
    two); then each test row with a class no training row has moves to training, so every class the
    classifier is tested on was trained."""
    n = len(hot)
    n_test = min(n - 1, max(1, round(n * test_fraction)))
    is_test = np.zeros(n, dtype=bool)
    is_test[np.random.default_rng(SPLIT_SEED).permutation(n)[:n_test]] = True
    trained = hot[~is_test].sum(0)
    for i in np.flatnonzero(is_test):
        if ((hot[i] > 0) & (trained == 0)).any():
            is_test[i] = False
            trained += hot[i]
    return is_test


def _csv_rows(csv_path: Path) -> tuple[list[tuple[str, str, str | None, int]], bool]:
    """The rows (path, label or labels text, split, line) and whether the manifest is multi-label.
    Line numbers are the file's own (blank lines and quoted line breaks counted), as an editor
    shows them."""
    try:
        with (
            open_regular(csv_path, "CSV manifest") as raw,
            io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as f,
        ):
            records = _records(csv.reader(f))
            _, header = next(records, (1, []))
            header = [h.strip() for h in header]
            column = _label_column(csv_path, header)
            rows = [_csv_row(csv_path, line, _as_dict(header, values), column) for line, values in records]
    except OSError as e:
        raise UsageError(f"cannot read {csv_path}: {e.strerror or e}") from None
    except (csv.Error, UnicodeDecodeError) as e:
        raise UsageError(f"{csv_path}: not a readable CSV file ({one_line(e)})") from None
    if not rows:
        raise UsageError(f"{csv_path}: no rows under the header")
    return rows, column == "labels"


def _records(reader) -> Iterator[tuple[int, list[str]]]:
    """(first line of the record, its values) for each non-blank record of a ``csv.reader``."""
    start = 1
    for values in reader:
        if values:
            yield start, values
        start = reader.line_num + 1


def _as_dict(header: list[str], values: list[str]) -> dict[str, str]:
    # As csv.DictReader: missing trailing values are empty, extra ones are dropped.
    return {k: values[i].strip() if i < len(values) else "" for i, k in enumerate(header)}


def _label_column(csv_path: Path, header: list[str]) -> str:
    if "label" in header and "labels" in header:
        raise UsageError(f"{csv_path}: has both a label and a labels column; keep one")
    column = "labels" if "labels" in header else "label"
    lacking = [c for c in ("path", column) if c not in header]
    if lacking:
        raise UsageError(
            f"{csv_path}: missing column(s) {', '.join(lacking)}; the header must be "
            f"path,label[,split] or path,labels[,split] (found: {','.join(header) or 'nothing'})"
        )
    return column


def _csv_row(csv_path: Path, line: int, row: dict, column: str = "label") -> tuple[str, str, str | None, int]:
    rel, label, split = row.get("path", ""), row.get(column, ""), row.get("split") or None
    if not rel or not label:
        what = "path" if not rel else "labels (no labels)" if column == "labels" else "label"
        raise UsageError(f"{csv_path}, line {line}: empty {what}")
    if not rel.lower().endswith(IMAGE_EXTENSIONS):
        raise UsageError(
            f"{csv_path}, line {line}: {printable(rel)} is not an image file ({' '.join(IMAGE_EXTENSIONS)})"
        )
    if split not in (None, "train", "test"):
        raise UsageError(f"{csv_path}, line {line}: split must be train or test (or empty), got {split!r}")
    return rel, label, split, line
