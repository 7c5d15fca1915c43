"""Labels as the data layer sees them: class ids ``[N]`` or multi-hot rows ``[N, C]`` (multi-label),
the one-line refusal for what needs one class per image, and the seeded random split of
multi-label data (where a stratified one is not defined).
"""

from __future__ import annotations

import numpy as np

from supcon.core.errors import UsageError


def refuse(what: str) -> None:
    """One line for what multi-label data cannot do."""
    raise UsageError(f"{what} needs one class per image; this dataset is multi-label (a labels column)")


def random_split(n: int, fraction: float, seed: int) -> np.ndarray:
    """A seeded random choice of ``round(n * fraction)`` (at least 1) of ``n`` indices, sorted: the split
    of multi-label data, where a stratified one is not defined (an image is in several classes)."""
    n_take = min(n, max(1, round(n * fraction)))
    return np.sort(np.random.default_rng(seed).permutation(n)[:n_take])
