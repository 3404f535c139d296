"""One small registry class for every extension point: PEFT methods, backbone families, tasks.

Each is filled by the file that defines the thing (a class decorator), refuses duplicate names and
lists what it holds; an unknown name is an error that names the nearest registered one.

>>> from vlpeft.registry import Registry
>>> shapes = Registry("shape", attribute="shape")
>>> @shapes.register("square")
... class Square: ...
>>> shapes.names(), Square.shape
(['square'], 'square')
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


def nearest_hint(key: str, valid: Iterable[str]) -> str:
    """For error messages: ``(did you mean 'x'?)`` naming the closest of ``valid``, or ``""``."""
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Registry(Generic[T]):
    """Name → class. ``register(name)`` also writes the name onto the class as ``attribute``.

    Args:
        what: what the entries are, for messages (``"method"``, ``"model family"``, ``"task"``).
        attribute: the class attribute that receives the registered name.
        error: the exception type of an unknown name.
    """

    def __init__(self, what: str, attribute: str, error: type[Exception] = KeyError) -> None:
        self.what, self.attribute, self.error = what, attribute, error
        self._entries: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def decorate(cls: type[T]) -> type[T]:
            if name in self._entries:
                raise ValueError(
                    f"{self.what} {name!r} is already registered by {self._entries[name].__name__}"
                )
            setattr(cls, self.attribute, name)
            self._entries[name] = cls
            return cls

        return decorate

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> type[T]:
        if name not in self._entries:
            raise self.error(
                f"unknown {self.what} {name!r}{nearest_hint(name, self._entries)}; "
                f"known: {self.names()}"
            )
        return self._entries[name]

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def items(self) -> list[tuple[str, type[T]]]:
        return sorted(self._entries.items())
