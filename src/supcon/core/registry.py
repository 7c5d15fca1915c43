"""Name -> factory registries for encoders and datasets, as timm's ``@register_model``.

The registries live here, apart from the modules that fill them, so that an encoder or dataset
module imports only this one (no import circles) and a new entry is one decorated function.

A family (``register_family("timm")``) takes every name ``timm:<name>``: its factory gets ``<name>``
as the first argument, and its optional ``check`` fails early (at config validation) when the
family cannot be used, e.g. for want of an optional package.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from supcon.core.errors import UsageError
from supcon.core.schema import short

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Callable[..., T]] = {}
        self._families: dict[str, tuple[Callable[..., T], Callable[[str], None] | None]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = fn
            return fn

        return deco

    def register_family(
        self, prefix: str, check: Callable[[str], None] | None = None
    ) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Register a factory ``fn(name, **kwargs)`` for every ``prefix:name``."""

        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            if prefix in self._families:
                raise ValueError(f"{self.kind} family {prefix!r} is registered twice")
            self._families[prefix] = (fn, check)
            return fn

        return deco

    def names(self) -> list[str]:
        return sorted(self._items) + [f"{p}:<name>" for p in sorted(self._families)]

    def get(self, name: str) -> Callable[..., T]:
        if name in self._items:
            return self._items[name]
        prefix, sep, rest = name.partition(":")
        if sep and prefix in self._families:
            fn, check = self._families[prefix]
            if not rest:
                raise UsageError(f"{self.kind} {short(name)}: name the model after '{prefix}:'")
            if check is not None:
                check(rest)
            return functools.partial(fn, rest)
        raise UsageError(f"unknown {self.kind} {short(name)}; choose one of: {', '.join(self.names())}")

    def __contains__(self, name: str) -> bool:
        prefix, sep, rest = name.partition(":")
        return name in self._items or bool(sep and rest and prefix in self._families)


ENCODERS: Registry[Any] = Registry("encoder")  # image batch [B, C, H, W] -> features [B, D]
register_encoder = ENCODERS.register
register_encoder_family = ENCODERS.register_family
DATASETS: Registry[Any] = Registry("dataset")  # -> supcon.data.datasets.ImageDataset
register_dataset = DATASETS.register
