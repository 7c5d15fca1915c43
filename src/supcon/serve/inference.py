"""A trained run as a Python object: :func:`load` -> :class:`TrainedModel` with ``embed``, ``predict``
and ``predict_proba`` on images given as arrays, PIL images or file paths.

Only safetensors weights and JSON/YAML are read (nothing is unpickled). The encoder comes from the
pre-training weights when the run has them (the contrastive representation), else from the
classifier's; predictions come from the classifier on the contrastive encoder (``linear``) when the
run has one, else from the cross-entropy model (``ce``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from supcon.core.config import from_dict
from supcon.core.errors import UsageError
from supcon.core.runtime import resolve_runtime
from supcon.core.schema import short
from supcon.data.dataset import ImageDataset, Normalize
from supcon.evaluation.evaluate import eval_mode
from supcon.models.build import load_phase_model
from supcon.runs.modelinfo import read_model_info

Space = Literal["encoder", "projection"]
ENCODER_PHASES = ("pretrain", "linear", "ce")  # where the encoder comes from, first found
CLASSIFIER_PHASES = ("linear", "ce")  # where predictions come from, first found


def weight_files(run_dir: Path) -> dict[str, Path]:
    """The phases whose weights a run folder holds: ``{phase: weights/<phase>.safetensors}``."""
    return {
        p: f
        for p in ("ce", "pretrain", "linear")
        if (f := Path(run_dir) / "weights" / f"{p}.safetensors").is_file()
    }


def _pick(
    found: dict[str, Path], wanted: str | None, order: tuple[str, ...], what: str, run_dir: Path
) -> str | None:
    if wanted is None:
        return next((p for p in order if p in found), None)
    if wanted not in order:
        raise UsageError(f"{what} must come from one of: {', '.join(order)}; got {short(wanted)}")
    if wanted not in found:
        raise UsageError(f"{run_dir} has no {wanted} weights (weights/{wanted}.safetensors)")
    return wanted


def _shape_only(info: dict[str, Any]) -> ImageDataset:
    """An empty dataset with the run's image size, channels and classes: all a model builder reads."""
    s, c = int(info["image_size"]), int(info["channels"])
    empty_x, empty_y = torch.zeros(0, s, s, c, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)
    return ImageDataset(info.get("dataset", "?"), empty_x, empty_y, empty_x, empty_y, list(info["classes"]))


class TrainedModel:
    """The models of a run folder, ready for inference (eval mode, float32).

    ``classes``: class names (label i is ``classes[i]``); ``image_size``, ``channels``: the input the
    model takes; ``norm``: the input standardisation; ``preprocess``: how an image file is resized;
    ``encoder_phase`` / ``classifier_phase``: which weights each came from (None: no classifier).
    """

    def __init__(self, run_dir: str | os.PathLike, device: str = "auto", encoder: str | None = None,
                 classifier: str | None = None):  # fmt: skip
        self.run_dir = Path(run_dir)
        found = weight_files(self.run_dir)
        self.encoder_phase = _pick(found, encoder, ENCODER_PHASES, "the encoder", self.run_dir)
        if self.encoder_phase is None:
            raise UsageError(
                f"{self.run_dir} has no trained encoder (no weights/{{pretrain,linear,ce}}.safetensors)"
            )
        self.classifier_phase = _pick(found, classifier, CLASSIFIER_PHASES, "the classifier", self.run_dir)
        self.info = read_model_info(self.run_dir)
        self.classes: list[str] = list(self.info["classes"])
        self.multilabel: bool = bool(self.info.get("multilabel", False))
        self.image_size: int = int(self.info["image_size"])
        self.channels: int = int(self.info["channels"])
        n = self.info.get("normalization")
        self.norm = None if n is None else Normalize(tuple(n["mean"]), tuple(n["std"]))
        self.preprocess: dict[str, Any] = dict(self.info["preprocess"])
        # Inference runs in float32: embeddings and exports are compared to 1e-4.
        self.rt = resolve_runtime(device, "fp32", channels_last=True)
        cfg, shape = from_dict({"model": self.info["model"]}), _shape_only(self.info)
        self._models = {
            p: load_phase_model(cfg, shape, p, found[p]).to(self.rt.device).eval()
            for p in {self.encoder_phase, self.classifier_phase} - {None}
        }

    def __repr__(self) -> str:
        return (
            f"TrainedModel({str(self.run_dir)!r}: {self.image_size}x{self.image_size}x{self.channels}, "
            f"{len(self.classes)} classes, encoder from {self.encoder_phase}, "
            f"classifier from {self.classifier_phase})"
        )

    def network(self, space: str) -> nn.Module:
        """The float-input network [B, C, S, S] (standardised) -> [B, D] of ``space``: ``encoder``
        features, ``projection`` (the contrastive head's output) or ``classifier`` logits."""
        if space == "encoder":
            return self._models[self.encoder_phase].encoder
        if space == "projection":
            if self.encoder_phase != "pretrain":
                raise UsageError(
                    f"the projection space needs pre-training weights (weights/pretrain.safetensors); "
                    f"{self.run_dir} has none, or the encoder was taken from {self.encoder_phase}"
                )
            return self._models["pretrain"]
        if space == "classifier":
            if self.classifier_phase is None:
                raise UsageError(
                    f"{self.run_dir} has no classifier (weights/linear.safetensors or ce.safetensors)"
                )
            return self._models[self.classifier_phase]
        raise UsageError(f"unknown space {short(space)}; choose encoder, projection or classifier")

    @torch.inference_mode()
    def outputs(self, x: torch.Tensor, space: str) -> torch.Tensor:
        """``space``'s outputs float32 [B, D] (on the CPU) of a uint8 batch [B, S, S, C] at the model's
        size (no L2 normalisation)."""
        net = self.network(space)
        with eval_mode(net):
            return net(self.rt.images(x, self.norm)).float().cpu()

    def _run(self, images: Any, space: str, batch_size: int) -> torch.Tensor:
        out = [self.outputs(b, space) for b in self.batches(images, batch_size)]
        if not out:
            width = self.outputs(
                torch.zeros(1, self.image_size, self.image_size, self.channels, dtype=torch.uint8), space
            ).shape[1]
            return torch.zeros(0, width)
        return torch.cat(out)

    def embed(
        self, images: Any, space: Space = "encoder", normalize: bool = True, batch_size: int = 256
    ) -> np.ndarray:
        """Embeddings float32 [N, D] of ``images`` (see :meth:`batches`): the encoder's features or the
        projection head's output, L2-normalised unless ``normalize=False``."""
        if space not in ("encoder", "projection"):
            raise UsageError(f"space must be encoder or projection, got {short(space)}")
        z = self._run(images, space, batch_size)
        return (F.normalize(z, dim=1) if normalize else z).numpy()

    def predict_proba(self, images: Any, batch_size: int = 256) -> np.ndarray:
        """Class probabilities float32 [N, num_classes]: the softmax of the classifier's logits, or
        for a multi-label run each class's sigmoid."""
        logits = self._run(images, "classifier", batch_size)
        return (logits.sigmoid() if self.multilabel else logits.softmax(1)).numpy()

    def predict(self, images: Any, batch_size: int = 256) -> list:
        """Predicted class names: one per image, or for a multi-label run a list per image (the classes
        whose probability is above 0.5)."""
        if self.multilabel:
            return [
                [c for c, p in zip(self.classes, row, strict=True) if p > 0.5]
                for row in self.predict_proba(images, batch_size)
            ]
        ids = self._run(images, "classifier", batch_size).argmax(1).tolist()
        return [self.classes[i] for i in ids]

    def batches(self, images: Any, batch_size: int = 256) -> Iterator[torch.Tensor]:
        """uint8 batches [B, S, S, C] of ``images``: a uint8 array or tensor [N, H, W, C], [H, W, C] or
        [H, W]; a PIL image; a file path; or a list of any of these. Images of another size or colour
        mode are converted as :attr:`preprocess` says (decoded with PIL)."""
        s, c = self.image_size, self.channels
        if isinstance(images, torch.Tensor | np.ndarray) and images.ndim == 4:
            _check_uint8(images)
            if tuple(images.shape[1:]) == (s, s, c):  # already model inputs: slice, no copy
                for i in range(0, len(images), batch_size):
                    yield torch.as_tensor(images[i : i + batch_size])
                return
            images = list(images)
        items = images if isinstance(images, list | tuple) else [images]
        for i in range(0, len(items), batch_size):
            chunk = [prepare(item, c, self.preprocess) for item in items[i : i + batch_size]]
            yield torch.from_numpy(np.stack(chunk))


def _check_uint8(a: Any) -> None:
    if a.dtype not in (np.uint8, torch.uint8):
        raise UsageError(f"images must be uint8 (0..255), got {a.dtype}")


def _to_pil(item: Any):
    from PIL import Image

    if isinstance(item, Image.Image):
        return item
    if isinstance(item, str | os.PathLike):
        from supcon.data.files import open_image

        path = Path(item)
        try:
            # Regular files only, opened non-blocking: a FIFO or device named here would block the
            # read forever (and deaf to SIGTERM); it is one line instead.
            with open_image(path) as im:
                im.load()
                return im
        except UsageError:
            raise
        except Exception as e:  # Pillow raises many kinds
            raise UsageError(
                f"cannot decode image {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            ) from None
    if isinstance(item, torch.Tensor | np.ndarray):
        a = np.asarray(item.cpu() if isinstance(item, torch.Tensor) else item)
        _check_uint8(a)
        if a.ndim in (2, 3) and min(a.shape[:2]) < 1:  # PIL would make an image of nothing
            raise UsageError(f"an image array must be at least 1x1 pixels, got shape {list(a.shape)}")
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[:, :, 0]
        if a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4)):
            return Image.fromarray(np.ascontiguousarray(a))
        raise UsageError(
            f"an image array must be [H, W, C] with 1, 3 or 4 channels or [H, W], got shape {list(a.shape)}"
        )
    raise UsageError(
        f"cannot read an image from {type(item).__name__}: give arrays, PIL images or file paths"
    )


def prepare(item: Any, channels: int, preprocess: dict[str, Any]) -> np.ndarray:
    """One image (array, PIL image or path) as the model takes it: uint8 [S, S, channels], converted
    to RGB (or greyscale for one channel) and resized as ``preprocess`` (a model.json entry) says."""
    from PIL import Image

    from supcon.data.files import to_rgb

    im = _to_pil(item)
    if min(im.size) < 1:
        raise UsageError(f"an image must be at least 1x1 pixels, got {im.size[0]}x{im.size[1]}")
    im = to_rgb(im)
    if channels == 1:
        im = im.convert("L")
    elif channels != 3:
        raise UsageError(f"images of {channels} channels cannot be read from image files")
    size = int(preprocess["size"])
    bilinear = Image.Resampling.BILINEAR
    if preprocess.get("resize") == "short-side":
        w, h = im.size
        scale = int(preprocess["resize_to"]) / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), bilinear, reducing_gap=2.0)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
    elif im.size != (size, size):
        im = im.resize((size, size), bilinear, reducing_gap=2.0)
    a = np.asarray(im, dtype=np.uint8)
    return a[:, :, None] if a.ndim == 2 else a


def load(run_dir: str | os.PathLike, device: str = "auto", encoder: str | None = None,
         classifier: str | None = None) -> TrainedModel:  # fmt: skip
    """The trained models of a run folder (see :class:`TrainedModel`)::

        m = supcon.load("runs/demo")
        z = m.embed(["a.png", "b.jpg"])          # float32 [2, D], L2-normalised
        m.predict(images)                        # ["cat", "dog", ...]

    ``encoder``/``classifier``: the phase whose weights to use (pretrain, linear, ce); by default the
    pre-trained encoder and the contrastive run's classifier (``linear``), else the cross-entropy model.
    """
    return TrainedModel(run_dir, device, encoder, classifier)
