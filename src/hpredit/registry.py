"""One registry type: names → objects of one base type, checked when they register.

Tasks (:func:`hpredit.evaluation.register_task`) and editor methods
(:func:`hpredit.editors.register_editor`) are each one :class:`Registry`. Registering refuses, with
one :class:`~hpredit.errors.HpreditError`: a name that is not a non-empty string, a name already
taken (unless ``replace=True``), an object of the wrong type, and a class that leaves an abstract
hook unimplemented; so a mistake shows when the code registering it runs, before any model loads.
Every user-facing list of names (CLI help, "unknown …" messages) is built from :meth:`Registry.names`.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from typing import Any, Generic, TypeVar, overload

from .errors import HpreditError

__all__ = ["Registry"]

T = TypeVar("T")


def _describe(obj: Any) -> str:
    if isinstance(obj, type):
        return f"the class {obj.__name__}"
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return f"{type(obj).__name__} {obj!r}"
    return f"{type(obj).__name__} instance"


def _a(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


class Registry(Generic[T]):
    """Names → registered objects, in registration order.

    Args:
        kind: what a name names, in messages (``task``, ``editor method``).
        base: the type every entry must have: an instance of it, or with ``classes`` a subclass.
        classes: entries are classes (subclasses of ``base``, none of their abstract methods left).
    """

    def __init__(self, kind: str, base: type, *, classes: bool = False):
        self.kind = kind
        self.base = base
        self.classes = classes
        self._entries: dict[str, T] = {}

    # ----------------------------------------------------------------- checks

    def check_entry(self, obj: Any) -> None:
        """Raise unless ``obj`` has the registry's type (and, for classes, implements every hook)."""
        kind, base = _a(self.kind), _a(self.base.__name__)
        if self.classes:
            if not (isinstance(obj, type) and issubclass(obj, self.base)):
                got = obj.__name__ if isinstance(obj, type) else _describe(obj)
                raise HpreditError(f"{kind} must be {base} subclass, got {got}")
        elif not isinstance(obj, self.base):
            raise HpreditError(f"{kind} must be {base} instance, got {_describe(obj)}")

    def check_name(self, name: Any) -> str:
        if not isinstance(name, str) or not name.strip():
            raise HpreditError(f"{self.kind} name must be a non-empty string, got {name!r}")
        return name

    # ----------------------------------------------------------------- use

    def register(self, name: str, obj: T, *, replace: bool = False) -> T:
        """Add ``obj`` under ``name`` (``replace``: also when the name is taken); ``obj`` back."""
        self.check_entry(obj)
        self.check_name(name)
        if self.classes and inspect.isabstract(obj):
            missing = ", ".join(sorted(getattr(obj, "__abstractmethods__", ())))
            raise HpreditError(f"{self.kind} {name!r}: {obj.__name__} does not implement {missing}")  # type: ignore[attr-defined]
        if name in self._entries and not replace:
            raise HpreditError(
                f"{self.kind} {name!r} is already registered ({_describe(self._entries[name])}): choose another "
                "name, or pass replace=True to replace it"
            )
        self._entries[name] = obj
        return obj

    def unregister(self, name: str) -> T:
        """Remove ``name``; the object it named."""
        self.get(name)
        return self._entries.pop(name)

    def get(self, name: str) -> T:
        """The object registered as ``name``; an unknown name is one error listing the known ones."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise HpreditError(f"unknown {self.kind} {name!r} (known: {', '.join(self._entries)})") from None

    def names(self) -> list[str]:
        """Every registered name, in registration order."""
        return list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def view(self) -> Sequence[str]:
        """A read-only sequence of the names that follows the registry (for a public constant)."""
        return _NamesView(self)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"


class _NamesView(Sequence[str]):
    """The names of a registry, read when used (so a name registered later is in it)."""

    def __init__(self, registry: Registry):
        self._registry = registry

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[str]: ...
    def __getitem__(self, i):
        return self._registry.names()[i]

    def __len__(self) -> int:
        return len(self._registry)

    def __contains__(self, name: object) -> bool:
        return name in self._registry

    def __iter__(self) -> Iterator[str]:
        return iter(self._registry)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (list, tuple, _NamesView)):
            return list(self) == list(other)
        return NotImplemented

    def __hash__(self) -> int:
        return id(self)

    def __repr__(self) -> str:
        return repr(tuple(self))
