"""Optional dependencies: `pip install pirl` gives the trainer and the benchmark; the extras add
the Kubeflow pipeline (`pipeline`), the benchmark's plot (`report`) and the demo's digits set
(`demo`). A feature that needs one imports it through `need`, which names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from pirl.errors import ConfigError


class MissingExtra(ConfigError):
    """An optional dependency is not installed."""


def need(module: str, extra: str, purpose: str) -> ModuleType:
    """`import module`, or MissingExtra saying which extra of pirl provides it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(
            f"{purpose} needs the Python package {module.split('.')[0]!r}, which a plain "
            f"`pip install pirl` leaves out: pip install 'pirl[{extra}]'"
        ) from None
