"""Rules that live beside the config fields: allowed values, bounds, and VISSL-only keys.

A schema field declares its rule where it is defined (`setting(0.07, gt=0)`); `check_tree`
applies every field's rule and then each section's own `check(path)` (rules between fields of one
section), so a section means the same in `pirl train` and `pirl benchmark`. Rules between
sections stay in `pirl.config` and `pirl.benchmark.config`, few and written out.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from pirl.errors import ConfigError


def setting(
    default: Any = dataclasses.MISSING,
    *,
    factory: Any = dataclasses.MISSING,
    choices: tuple = (),
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    vissl_only: bool = False,
) -> Any:
    """A dataclass field with its rule: `choices` (for a list: of every item), bounds (`ge` >=,
    `gt` >, `le` <=, `lt` <), or `vissl_only` (kept so VISSL's YAML loads; nothing reads it)."""
    metadata = {
        "choices": tuple(choices),
        "lower": (ge, "[") if ge is not None else (gt, "(") if gt is not None else None,
        "upper": (le, "]") if le is not None else (lt, ")") if lt is not None else None,
        "vissl_only": vissl_only,
    }
    return dataclasses.field(default=default, default_factory=factory, metadata=metadata)


def one_of(path: str, value: Any, allowed: tuple | list | set) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{path}={value!r} is not supported; use one of {sorted(allowed)}{hint}")


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_bounds(path: str, value: float, lower: tuple | None, upper: tuple | None) -> None:
    low_ok = lower is None or (value >= lower[0] if lower[1] == "[" else value > lower[0])
    high_ok = upper is None or (value <= upper[0] if upper[1] == "]" else value < upper[0])
    if low_ok and high_ok:
        return
    if lower is not None and upper is not None:
        wanted = f"in {lower[1]}{lower[0]}, {upper[0]}{upper[1]}"
    elif lower is not None:
        wanted = f"{'>=' if lower[1] == '[' else '>'} {lower[0]}"
    else:
        assert upper is not None
        wanted = f"{'<=' if upper[1] == ']' else '<'} {upper[0]}"
    raise ConfigError(f"{path} must be {wanted}, got {value!r}")


def check_tree(node: Any, path: str) -> None:
    """Every field rule in the dataclass tree `node` (named `path` in messages), then each
    section's `check(path)`, innermost first."""
    for f in dataclasses.fields(node):
        value, where = getattr(node, f.name), f"{path}.{f.name}"
        if dataclasses.is_dataclass(value):
            check_tree(value, where)
            continue
        if f.metadata.get("choices"):
            items = enumerate(value) if isinstance(value, list) else [(None, value)]
            for i, item in items:
                one_of(where if i is None else f"{where}[{i}]", item, f.metadata["choices"])
        if f.metadata.get("lower") or f.metadata.get("upper"):
            check_bounds(where, value, f.metadata["lower"], f.metadata["upper"])
    section_check = getattr(node, "check", None)
    if section_check is not None:
        section_check(path)


def vissl_only_values(node: Any, path: str) -> list[str]:
    """`path.KEY=value` for every VISSL-only key of the tree set to other than its default."""
    found = []
    for f in dataclasses.fields(node):
        value, where = getattr(node, f.name), f"{path}.{f.name}"
        if dataclasses.is_dataclass(value):
            found += vissl_only_values(value, where)
        elif f.metadata.get("vissl_only") and value != _default(f):
            found.append(f"{where}={value!r}")
    return found


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default
