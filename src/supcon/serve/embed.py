"""``supcon embed``: the embeddings of a dataset under a trained run's encoder, written to a file.

Rows stream through the model batch by batch (any image set with ``len`` and slices works: uint8
tensors or stored large-image sets). ``.npz`` (numpy) holds ``embeddings`` float32 [N, D],
``labels`` int64 [N], ``class_names`` [N], ``splits`` [N], ``indices`` [N] (position in its split),
``paths`` [N] when the images came from files, and ``classes`` [K]; ``.parquet`` has one row per
image (``index``, ``path``, ``split``, ``label``, ``class_name``, ``embedding`` as a fixed-size list)
written in row groups. ``--projector DIR`` adds TensorBoard projector files for the first images.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from supcon.core.errors import UsageError
from supcon.core.files import atomic_write, check_regular_output
from supcon.core.schema import short
from supcon.data.dataset import ImageDataset
from supcon.data.datasets import load_dataset
from supcon.serve.inference import TrainedModel, load
from supcon.serve.options import EMBED_FORMATS, PROJECTOR_COUNT, SPLITS

_ROW_GROUP = 8192  # parquet rows per row group
_SPRITE_MAX = 8192  # TensorBoard's largest sprite side, in pixels
_THUMB_MAX = 64


@dataclass
class EmbedRows:
    split: str
    index: np.ndarray  # int64 [B], position in its split
    paths: list[str] | None
    labels: np.ndarray  # int64 [B]
    class_names: list[str]
    z: np.ndarray  # float32 [B, D]
    images: torch.Tensor  # uint8 [B, S, S, C]


def check_output(out: Path, overwrite: bool) -> str:
    """The format of ``out`` by its extension; refuses an existing file without ``overwrite``."""
    fmt = out.suffix.lower()
    if fmt not in EMBED_FORMATS:
        raise UsageError(f"unknown output format {short(out.name)}: name the file .npz (numpy) or .parquet")
    if fmt == ".parquet" and importlib.util.find_spec("pyarrow") is None:
        raise UsageError("writing .parquet needs pyarrow: pip install 'supcon[parquet]' (or write .npz)")
    check_regular_output(out)  # a device node or FIFO is never replaced, --overwrite or not
    if out.exists() and not overwrite:
        raise UsageError(f"{out} exists; use --overwrite to replace it")
    return fmt


def dataset_for(run_dir: Path, model: TrainedModel, path: str | None, progress: bool) -> ImageDataset:
    """The run's own dataset (from its config), or the data at ``path`` (an image folder is resized to
    the model's image size); ``UsageError`` when the model cannot take its images."""
    if path is None:
        from supcon.data.datasets import load_split
        from supcon.runs.folder import read_config

        cfg = read_config(run_dir)
        data, _ = load_split(cfg.data, cfg.seed, progress)  # as training saw it (exclusions and all)
        source = f"the run's dataset {data.name}"
    else:
        data = load_dataset(None, path, progress=progress, if_supported={"image_size": model.image_size})
        source = str(path)
    s, c = model.image_size, model.channels
    if data.multilabel != model.multilabel:
        kinds = {True: "multi-label (several classes an image)", False: "single-label"}
        raise UsageError(
            f"{source} is {kinds[data.multilabel]} but the run was trained on {kinds[model.multilabel]} "
            "data: embed data labelled as the run's was"
        )
    if (data.image_size, data.channels) != (s, c):
        raise UsageError(
            f"{source} holds {data.image_size}x{data.image_size}x{data.channels} images but the model takes "
            f"{s}x{s}x{c}"
        )
    return data


def batches(model: TrainedModel, data: ImageDataset, split: str, space: str, normalize: bool,
            batch_size: int, bar) -> Iterator[EmbedRows]:  # fmt: skip
    """The embeddings of ``split`` (train, test or all: train then test), one batch at a time."""
    parts = ("train", "test") if split == "all" else (split,)
    for part in parts:
        x, y = getattr(data, f"{part}_x"), getattr(data, f"{part}_y")
        paths = getattr(data, f"{part}_paths", None)
        for i in range(0, len(x), batch_size):
            images = torch.as_tensor(x[i : i + batch_size])
            z = model.outputs(images, space)
            z = F.normalize(z, dim=1) if normalize else z
            labels = np.asarray(y[i : i + batch_size], dtype=np.int64)
            names = _class_names(labels, data.classes)
            labels = labels if labels.ndim == 1 else np.full(len(labels), -1, np.int64)
            bar.update(len(images))
            yield EmbedRows(
                part,
                np.arange(i, i + len(images), dtype=np.int64),
                None if paths is None else [str(p) for p in paths[i : i + batch_size]],
                labels,
                names,
                z.numpy(),
                images,
            )


def _class_names(labels: np.ndarray, classes: list[str]) -> list[str]:
    """One name per row; for multi-hot rows [B, C] (multi-label data, whose label column is then -1)
    the names of its classes joined by ``|``."""
    if labels.ndim == 1:
        return [classes[k] for k in labels]
    return ["|".join(classes[k] for k in np.flatnonzero(row)) for row in labels]


def write_npz(tmp: str, rows: Iterator[EmbedRows], classes: list[str]) -> int:
    """Collect the rows (the [N, D] float32 matrix is small beside the images) and save them."""
    got = list(rows)
    cols: dict[str, np.ndarray] = {
        "embeddings": np.concatenate([b.z for b in got]) if got else np.zeros((0, 0), np.float32),
        "labels": np.concatenate([b.labels for b in got]) if got else np.zeros(0, np.int64),
        "class_names": np.array([n for b in got for n in b.class_names], dtype=str),
        "splits": np.array([b.split for b in got for _ in b.labels], dtype=str),
        "indices": np.concatenate([b.index for b in got]) if got else np.zeros(0, np.int64),
        "classes": np.array(classes, dtype=str),
    }
    if got and all(b.paths is not None for b in got):
        cols["paths"] = np.array([p for b in got for p in b.paths], dtype=str)
    with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a name
        np.savez(f, **cols)
    return len(cols["labels"])


def write_parquet(tmp: str, rows: Iterator[EmbedRows], dim: int, metadata: dict) -> int:
    """Stream the rows into row groups of up to 8192 rows (memory stays bounded)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fields = [
        ("index", pa.int64()), ("path", pa.string()), ("split", pa.string()), ("label", pa.int64()),
        ("class_name", pa.string()), ("embedding", pa.list_(pa.float32(), dim)),
    ]  # fmt: skip
    schema = pa.schema(fields, metadata={"supcon": json.dumps(metadata)})
    n, pending = 0, []
    with pq.ParquetWriter(tmp, schema) as writer:
        for b in [*rows, None]:
            if b is not None:
                pending.append(b)
                n += len(b.labels)
            if pending and (b is None or sum(len(p.labels) for p in pending) >= _ROW_GROUP):
                writer.write_table(_table(pending, schema, dim))
                pending = []
    return n


def _table(got: list[EmbedRows], schema, dim: int):
    import pyarrow as pa

    z = np.concatenate([b.z for b in got]).astype(np.float32).reshape(-1)
    cols = {
        "index": np.concatenate([b.index for b in got]),
        "path": [p for b in got for p in (b.paths or [None] * len(b.labels))],
        "split": [b.split for b in got for _ in b.labels],
        "label": np.concatenate([b.labels for b in got]),
        "class_name": [n for b in got for n in b.class_names],
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(z, pa.float32()), dim),
    }
    return pa.table(cols, schema=schema)


class Projector:
    """Keeps the first ``count`` rows (embeddings and thumbnails) for TensorBoard's projector."""

    def __init__(self, count: int, image_size: int):
        self.count = count
        self.grid = max(1, math.ceil(math.sqrt(count)))
        self.thumb = max(1, min(image_size, _THUMB_MAX, _SPRITE_MAX // self.grid))
        self.kept: list[EmbedRows] = []
        self.n = 0

    def watch(self, rows: Iterator[EmbedRows]) -> Iterator[EmbedRows]:
        for b in rows:
            take = min(len(b.labels), self.count - self.n)
            if take > 0:
                thumbs = F.interpolate(
                    b.images[:take].permute(0, 3, 1, 2).float(), size=(self.thumb, self.thumb),
                    mode="bilinear", antialias=True,
                ).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)  # fmt: skip
                self.kept.append(_head(b, take, thumbs))
                self.n += take
            yield b

    def write(self, folder: Path, name: str) -> int:
        """``tensors.tsv``, ``metadata.tsv``, ``sprite.png`` and ``projector_config.pbtxt`` in ``folder``."""
        from PIL import Image

        z = np.concatenate([b.z for b in self.kept]) if self.kept else np.zeros((0, 0), np.float32)
        n, t = len(z), self.thumb
        _atomic_text(folder / "tensors.tsv", "".join("\t".join(f"{v:.6g}" for v in row) + "\n" for row in z))
        with_paths = bool(self.kept) and all(b.paths is not None for b in self.kept)
        lines = ["label\tclass\tsplit\tindex" + ("\tpath\n" if with_paths else "\n")] + [
            f"{lab}\t{_tsv(c)}\t{b.split}\t{k}" + (f"\t{_tsv(b.paths[i])}\n" if with_paths else "\n")
            for b in self.kept
            for i, (lab, c, k) in enumerate(zip(b.labels, b.class_names, b.index, strict=True))
        ]
        _atomic_text(folder / "metadata.tsv", "".join(lines))
        side = max(1, math.ceil(math.sqrt(n)))
        thumbs = (
            torch.cat([b.images for b in self.kept]).numpy()
            if self.kept
            else np.zeros((0, t, t, 3), np.uint8)
        )
        sheet = np.zeros((side * t, side * t, thumbs.shape[3]), np.uint8)
        for k, im in enumerate(thumbs):
            r, c = divmod(k, side)
            sheet[r * t : (r + 1) * t, c * t : (c + 1) * t] = im
        img = Image.fromarray(sheet[:, :, 0] if sheet.shape[2] == 1 else sheet)
        atomic_write(folder / "sprite.png", lambda tmp: img.save(tmp, format="PNG"))
        config = (
            f'embeddings {{\n  tensor_name: "{name}"\n  tensor_shape: {n}\n  tensor_shape: {z.shape[1]}\n'
            '  tensor_path: "tensors.tsv"\n  metadata_path: "metadata.tsv"\n'
            f'  sprite {{\n    image_path: "sprite.png"\n'
            f"    single_image_dim: {t}\n    single_image_dim: {t}\n  }}\n}}\n"
        )
        _atomic_text(folder / "projector_config.pbtxt", config)
        return n


def _head(b: EmbedRows, take: int, thumbs: torch.Tensor) -> EmbedRows:
    paths = b.paths[:take] if b.paths is not None else None
    return EmbedRows(
        b.split, b.index[:take], paths, b.labels[:take], b.class_names[:take], b.z[:take], thumbs
    )


def _tsv(text: str) -> str:
    return str(text).replace("\t", " ").replace("\n", " ").replace("\r", " ")


def _atomic_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _check_projector(folder: Path, overwrite: bool) -> None:
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--projector {folder} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise UsageError(f"--projector folder {folder} is not empty; use --overwrite to replace its files")


def embed_run(
    run_dir: str | Path,
    out: str | Path,
    *,
    data: str | None = None,
    split: str = "test",
    space: str = "encoder",
    normalize: bool = True,
    overwrite: bool = False,
    projector: str | Path | None = None,
    projector_count: int = PROJECTOR_COUNT,
    batch_size: int = 256,
    device: str = "auto",
    progress: bool = True,
) -> dict:
    """Embed ``split`` of the run's dataset (or of the data at ``data``) and write ``out`` (.npz or
    .parquet). Returns ``{"out", "count", "dim", "space", "normalized", "projector"}``."""
    from tqdm import tqdm

    run_dir, out = Path(run_dir), Path(out)
    if split not in SPLITS:
        raise UsageError(f"split must be one of: {', '.join(SPLITS)}; got {short(split)}")
    if space not in ("encoder", "projection"):
        raise UsageError(f"space must be encoder or projection, got {short(space)}")
    if batch_size < 1 or projector_count < 1:
        raise UsageError("the batch size and the projector count must be positive")
    fmt = check_output(out, overwrite)
    if projector is not None:
        _check_projector(Path(projector), overwrite)
    model = load(run_dir, device)
    model.network(space)  # a projection space the run does not have fails before any data loads
    ds = dataset_for(run_dir, model, data, progress)
    total = sum(len(getattr(ds, f"{p}_x")) for p in (("train", "test") if split == "all" else (split,)))
    probe = torch.zeros(1, model.image_size, model.image_size, model.channels, dtype=torch.uint8)
    dim = int(model.outputs(probe, space).shape[1])
    proj = Projector(projector_count, model.image_size) if projector is not None else None
    with tqdm(total=total, unit="img", desc=f"embed {split}", disable=not progress) as bar:
        rows = batches(model, ds, split, space, normalize, batch_size, bar)
        rows = proj.watch(rows) if proj is not None else rows
        meta = {"run": str(run_dir), "space": space, "normalized": normalize, "classes": ds.classes}
        counted: list[int] = []
        if fmt == ".npz":
            atomic_write(out, lambda tmp: counted.append(write_npz(tmp, rows, ds.classes)))
        else:
            atomic_write(out, lambda tmp: counted.append(write_parquet(tmp, rows, dim, meta)))
    shown = proj.write(Path(projector), f"{ds.name} {space}") if proj is not None else None
    return {
        "out": out,
        "count": counted[0],
        "dim": dim,
        "space": space,
        "normalized": normalize,
        "projector": shown,
    }


def main(args: argparse.Namespace) -> int:
    r = embed_run(
        args.from_dir, args.out, data=args.data, split=args.split, space=args.space,
        normalize=not args.no_normalize, overwrite=args.overwrite, projector=args.projector,
        projector_count=args.projector_count, batch_size=args.batch_size, device=args.device,
        progress=not args.quiet,
    )  # fmt: skip
    how = "L2-normalised" if r["normalized"] else "not normalised"
    print(f"wrote {r['count']} embeddings ({r['dim']}-d {r['space']} space, {how}) to {r['out']}")
    if r["projector"] is not None:
        shown = (
            f"the first {r['projector']} of {r['count']}"
            if r["projector"] < r["count"]
            else f"all {r['count']}"
        )
        print(f"projector: {shown} images in {args.projector} (tensorboard --logdir {args.projector})")
    return 0
