"""How messages show a long list: the first few entries, then how many there are in all.

Every error or warning that names layers, keys or problems shows them through :func:`shorten`, so a
model with hundreds of merged layers or a file with hundreds of bad keys still gives a readable message.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["shorten"]


def shorten(items: Iterable[Any], limit: int = 6, *, sep: str = ", ", noun: str = "", as_list: bool = False) -> str:
    """The first ``limit`` of ``items`` for a message, and their number when some are left out.

    Args:
        items: What to show (each through ``str``, or ``repr`` inside a list with ``as_list``).
        limit: How many to show at most.
        sep: What separates them (and the closing ``...``).
        noun: What is counted, for ``(9 problems in all)``; default ``(9 in all)``.
        as_list: Show them as a Python list, ``['a', 'b'] ... (9 in all)``.

    Example::

        >>> shorten(["a", "b", "c"], 2), shorten(["a", "b"], 2), shorten(["a", "b", "c"], 2, as_list=True)
        ('a, b, ... (3 in all)', 'a, b', "['a', 'b'] ... (3 in all)")
    """
    items = list(items)
    head = repr(items[:limit]) if as_list else sep.join(str(item) for item in items[:limit])
    if len(items) <= limit:
        return head
    count = f"({len(items)} {noun} in all)" if noun else f"({len(items)} in all)"
    return f"{head} ... {count}" if as_list else f"{head}{sep}... {count}"
