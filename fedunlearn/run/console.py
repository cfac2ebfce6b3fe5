"""Console output helpers: :func:`listed` writes ids into a one-line message (a count and the
first few of a long list)."""

from __future__ import annotations

from collections.abc import Iterable


def listed(ids: Iterable[int], noun: str = "client", *, first: int = 5) -> str:
    """Ids for a one-line message: all of a short list, a count and the first few of a long
    one (a start-up timeout at 100,000 clients must not print a 600 kB line).

    >>> listed([3])
    'clients [3]'
    >>> listed(range(100_000))
    '100000 clients (0, 1, 2, 3, 4, ...)'
    >>> listed([9, 2, 7], "node")
    'nodes [9, 2, 7]'
    """
    ids = list(ids)
    if len(ids) <= first:
        return f"{noun}s {ids}"
    return f"{len(ids)} {noun}s ({', '.join(str(i) for i in ids[:first])}, ...)"
