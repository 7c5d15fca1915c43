"""Name -> factory registries for encoders and datasets, as timm's ``@register_model``.

The registries live here, apart from the modules that fill them, so that an encoder or dataset
module imports only this one (no import circles) and a new entry is one decorated function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from supcon.errors import UsageError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = fn
            return fn

        return deco

    def names(self) -> list[str]:
        return sorted(self._items)

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._items[name]
        except KeyError:
            raise UsageError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def __contains__(self, name: str) -> bool:
        return name in self._items


ENCODERS: Registry[Any] = Registry("encoder")  # image batch [B, C, H, W] -> features [B, D]
register_encoder = ENCODERS.register
DATASETS: Registry[Any] = Registry("dataset")  # -> supcon.datasets.ImageDataset
register_dataset = DATASETS.register
