"""Classes registered by name (losses, importance scorers): ``@register("name")`` on a class."""
from __future__ import annotations

from collections.abc import Callable


def registrar(table: dict[str, type], what: str) -> Callable[[str], Callable[[type], type]]:
    """A ``register(name)`` class decorator that files classes in ``table`` and names them
    (``cls.name``); a second, different class under a taken name is refused."""
    def register(name: str) -> Callable[[type], type]:
        def add(cls: type) -> type:
            if name in table and table[name] is not cls:
                raise ValueError(f"{what} named {name!r} is already registered ({table[name].__name__})")
            cls.name = name
            table[name] = cls
            return cls
        return add
    return register
