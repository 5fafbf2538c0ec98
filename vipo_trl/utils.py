"""Small helpers shared across the package: stable seeds, "did you mean" hints and name registries."""

from __future__ import annotations

import difflib
import hashlib
import importlib
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def stable_seed(*parts: int | str) -> int:
    """A 63-bit seed that depends only on `parts` (not on the process, the rank or Python's hash salt)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def pyplot_or_none(figure: str) -> Any:
    """matplotlib's pyplot on the file-only Agg backend, or `None` with a warning that `figure` is not drawn when
    matplotlib is not installed: the reports' plots are optional, their numbers are written regardless."""
    try:
        import matplotlib
    except ImportError:
        import warnings

        warnings.warn(f"{figure} not drawn: matplotlib is not installed (pip install matplotlib).", stacklevel=3)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`" Did you mean 'x'?"` for the closest of `choices` to a mistyped `name`, or `""` when none is close."""
    close = difflib.get_close_matches(name, sorted(choices), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


class Registry(Generic[T]):
    """Names -> objects (losses, scorers, model families), with one error for an unknown or duplicate name."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T, override: bool = False) -> T:
        if name in self._items and not override:
            raise ValueError(f"A {self.kind} named {name!r} is already registered; pass override=True to replace it.")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ValueError(
                f"Unknown {self.kind} {name!r}.{did_you_mean(str(name), self._items)} "
                f"Available: {', '.join(self.names())}."
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module-level `__getattr__` (PEP 562) that imports `exports[name]`, a submodule relative to `package`, on
    first use: keeps `import vipo_trl` and `--help` free of the heavy libraries until they are needed."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name], package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
