"""Reading back files that may not be what they claim: bounded parsing and typed fields.

Every file supcon reads back (a preset or ``--config`` YAML, a run folder's ``config.yaml`` and
``model.json``, a checkpoint's metadata) may have been edited, damaged or written by someone else.
The readers here bound what parsing may cost (size, YAML aliases, nesting depth, binary content) and
check each field's type and range, so that a bad file ends in one :class:`UsageError` line naming the
file and the key, never a ``KeyError``/``TypeError``/``RecursionError`` deep inside, and error
messages never print an unbounded value (:func:`short`).
"""

from __future__ import annotations

import json
import math
import reprlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from supcon.core.errors import UsageError

MAX_TEXT_BYTES = 1 << 20  # a config or model.json is a few KB; 1 MiB is generous
MAX_ALIASES = 64  # presets use anchors sparingly; an alias bomb uses thousands
MAX_DEPTH = 32  # configs nest three levels

_repr = reprlib.Repr()
_repr.maxstring, _repr.maxother, _repr.maxlist, _repr.maxdict, _repr.maxlevel = 60, 60, 6, 6, 3
_repr.maxlong = 40


def short(value: Any, limit: int = 100) -> str:
    """``repr(value)`` cut to about ``limit`` characters: error messages print values from files and
    the command line, which can be huge (an alias bomb's repr alone needs gigabytes)."""
    text = _repr.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_text(path: Path, what: str, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """A small UTF-8 text file; refuses non-regular files (a FIFO would block), oversize or binary."""
    path = Path(path)
    try:
        if not path.is_file():
            raise UsageError(
                f"{what} {path} is not a regular file" if path.exists() else f"{what} not found: {path}"
            )
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror or e}") from None
    return decode_text(data, f"{what} {path}", max_bytes)


def decode_text(data: bytes, source: str, max_bytes: int = MAX_TEXT_BYTES) -> str:
    if len(data) > max_bytes:
        raise UsageError(f"{source} is larger than {max_bytes // 1024} KiB: not a supcon file")
    if b"\0" in data:
        raise UsageError(f"{source} is a binary file, not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{source} is not UTF-8 text (byte {e.start})") from None


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that counts aliases and limits nesting while composing, before any value is built."""

    def __init__(self, stream):
        super().__init__(stream)
        self._aliases = 0
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise _Bounded(f"more than {MAX_ALIASES} aliases (*name)")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Bounded(f"nested deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _Bounded(Exception):
    pass


def load_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load`` with bounded size, aliases and depth; errors are one line naming ``source``."""
    if len(text) > MAX_TEXT_BYTES:
        raise UsageError(f"{source} is larger than {MAX_TEXT_BYTES // 1024} KiB: not a supcon config")
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except _Bounded as e:
        raise UsageError(f"{source}: refused: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UsageError(f"{source}:{where}: not valid YAML ({short(problem, 120)})") from None
    except (RecursionError, MemoryError, ValueError, OverflowError) as e:
        raise UsageError(f"{source}: unreadable YAML ({type(e).__name__})") from None


def load_json(text: str, source: str) -> Any:
    """``json.loads`` with bounded size and depth; errors are one line naming ``source``."""
    if len(text) > MAX_TEXT_BYTES:
        raise UsageError(f"{source} is larger than {MAX_TEXT_BYTES // 1024} KiB")
    try:
        value = json.loads(text)
    except RecursionError:
        raise UsageError(f"{source}: nested too deeply") from None
    except ValueError as e:
        raise UsageError(f"{source}: not valid JSON ({short(str(e), 120)})") from None
    if _depth(value) > MAX_DEPTH:
        raise UsageError(f"{source}: nested deeper than {MAX_DEPTH} levels")
    return value


def _depth(value: Any, level: int = 0) -> int:
    # Iterative in spirit: stops descending once past the limit, so it cannot recurse without bound.
    if level > MAX_DEPTH or not isinstance(value, dict | list):
        return level
    items = value.values() if isinstance(value, dict) else value
    return max((_depth(v, level + 1) for v in items), default=level + 1)


_KINDS = {
    "int": "an integer",
    "number": "a finite number",
    "bool": "true or false",
    "str": "a string",
    "mapping": "a mapping",
    "list": "a list",
}


def field(data: Any, key: str, kind: str, source: str, *, ge: float | None = None,
          le: float | None = None, choices: tuple | None = None, optional: bool = False) -> Any:  # fmt: skip
    """``data[key]`` checked: present (unless ``optional``, then None when absent or null), of
    ``kind`` (one of int, number, bool, str, mapping, list; bools are not numbers), within
    ``ge``..``le`` and one of ``choices``. ``UsageError`` naming ``source`` and ``key`` otherwise.
    ``key`` may be dotted (``normalization.std``): the last part is looked up in ``data``."""
    name = key.rsplit(".", 1)[-1]
    if not isinstance(data, Mapping):
        raise UsageError(f"{source}: {key.rsplit('.', 1)[0] if '.' in key else 'the file'} must be a mapping")
    if name not in data or data[name] is None:
        if optional:
            return None
        raise UsageError(f"{source}: {key} is missing")
    value = data[name]
    check_value(value, kind, f"{source}: {key}", ge=ge, le=le, choices=choices)
    return value


def check_value(value: Any, kind: str, what: str, *, ge: float | None = None, le: float | None = None,
                choices: tuple | None = None) -> None:  # fmt: skip
    """``value`` is of ``kind`` (see :func:`field`) and in range, else a ``UsageError`` about ``what``."""
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, int | float)
        and not isinstance(value, bool)
        and (isinstance(value, int) or math.isfinite(value)),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "mapping": isinstance(value, Mapping),
        "list": isinstance(value, list),
    }[kind]
    if not ok:
        raise UsageError(f"{what} must be {_KINDS[kind]}, got {short(value, 60)}")
    if choices is not None and value not in choices:
        raise UsageError(f"{what} must be one of {', '.join(map(str, choices))}; got {short(value, 60)}")
    if ge is not None and value < ge:
        raise UsageError(f"{what} must be at least {ge:g}, got {short(value, 40)}")
    if le is not None and value > le:
        raise UsageError(f"{what} must be at most {le:g}, got {short(value, 40)}")


def number_list(data: Any, key: str, source: str, length: int, *, gt: float | None = None) -> list[float]:
    """``data[key]``: a list of ``length`` finite numbers, each above ``gt`` when given."""
    values = field(data, key, "list", source)
    if len(values) != length:
        raise UsageError(f"{source}: {key} must hold {length} numbers, got {len(values)}")
    for i, v in enumerate(values):
        check_value(v, "number", f"{source}: {key}[{i}]")
        if gt is not None and not v > gt:
            raise UsageError(f"{source}: {key}[{i}] must be above {gt:g}, got {short(v, 40)}")
    return [float(v) for v in values]
