"""The scope of one analysis call, in which facts about a model are computed once.

:func:`one_view` opens it (:func:`per_call` is its decorator form); :func:`memo` returns a
value computed once per object within it and computes afresh outside it. Calls nest: an
analysis calling another shares the outer call's scope. Objects are kept alive while the
scope lasts, so an ``id`` is never reused within it.
"""

import contextlib
import functools
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

# (kind, id) -> (object kept alive so its id is not reused, value)
_SCOPE: ContextVar[dict[tuple[str, int], tuple[Any, Any]] | None] = ContextVar(
    "mechcna_scope", default=None
)


@contextlib.contextmanager
def one_view() -> Iterator[None]:
    """A scope in which each model's facts are computed once (nested scopes share the outer)."""
    if _SCOPE.get() is not None:
        yield
        return
    token = _SCOPE.set({})
    try:
        yield
    finally:
        _SCOPE.reset(token)


def per_call(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` in :func:`one_view` (for public, read-only analysis functions)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with one_view():
            return fn(*args, **kwargs)

    return wrapper


def memo(kind: str, obj: Any, compute: Callable[[], R]) -> R:
    """``compute()``, once per ``(kind, obj)`` within a scope; afresh outside any scope."""
    table = _SCOPE.get()
    if table is None:
        return compute()
    key = (kind, id(obj))
    hit = table.get(key)
    if hit is not None and hit[0] is obj:
        return hit[1]
    value = compute()
    table[key] = (obj, value)
    return value
