"""Removal requests at three granularities, parsed from ``unlearning.requests``.

Each entry of ``unlearning.requests`` is one request, served in order; what a later request
sees is what the earlier ones left::

    requests = [
        [0],                                  # client 0, whole (client level)
        [3, 7],                               # clients 3 and 7 together
        {client = 4},                         # client 4, whole (as [4])
        {client = 3, samples = "backdoor"},   # client 3's backdoored samples (sample level)
        {client = 5, samples = [4, 17, 90]},  # those samples of client 5 (positions in its data)
        {client = 5, fraction = 0.1},         # a tenth of what client 5 still holds, drawn
        {client = 5, fraction = 0.1, seed = 9},  # ... with this seed (default: the run's)
        {label = 7},                          # every sample of class 7, on every client
    ]

A client-level request removes the client from the federation. A sample- or class-level one
removes samples: their clients stay and go on training on what they keep (a client left with
no sample leaves the federation). This module checks what needs no data (shape, keys, ranges,
clients already removed); :func:`fedunlearn.data.removal.check_against_data` checks the rest
(sample positions, labels, a request that would remove nothing) once the data is built, before
any work. Resolution into samples: :mod:`fedunlearn.data.removal`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

Granularity = Literal["client", "samples", "class"]
GRANULARITIES: tuple[Granularity, ...] = ("client", "samples", "class")
"""Every granularity, in the order tables list them."""

_SAMPLE_KEYS = {"client", "samples", "fraction", "seed"}
_FORMS = ("[0], [3, 7] or {client = 3} (clients), {client = 3, samples = \"backdoor\"}, "
          "{client = 3, samples = [4, 17]}, {client = 3, fraction = 0.1} or {label = 7}")


class RequestSyntaxError(ValueError):
    """An entry of ``unlearning.requests`` that is not a request (the config tree reports it
    under the key ``unlearning.requests``)."""


@dataclass(frozen=True)
class Request:
    """One removal request.

    ``clients``: the clients removed whole (client level) or the one client whose samples go
    (sample level; empty at class level). Sample level selects by exactly one of ``indices``
    (positions in the client's data), ``fraction`` (of the samples the client still holds,
    drawn with ``seed``, or the run's seed when None) or ``backdoor`` (the samples the backdoor
    poisoned). Class level removes every sample labelled ``label``.
    """

    granularity: Granularity
    clients: tuple[int, ...] = ()
    indices: tuple[int, ...] = ()
    fraction: float | None = None
    seed: int | None = None
    backdoor: bool = False
    label: int | None = None

    @property
    def client(self) -> int:
        """The client of a sample-level request."""
        assert self.granularity == "samples"
        return self.clients[0]

    def describe(self) -> str:
        """A few words for messages and tables: ``client 3``, ``samples of client 3
        (backdoor)``, ``class 7``."""
        if self.granularity == "client":
            noun = "client" if len(self.clients) == 1 else "clients"
            return f"{noun} {', '.join(map(str, self.clients))}"
        if self.granularity == "class":
            return f"class {self.label}"
        what = ("backdoor" if self.backdoor else f"fraction {self.fraction:g}"
                if self.fraction is not None else f"{len(self.indices)} listed")
        return f"samples of client {self.client} ({what})"


def parse_request(i: int, raw: Any) -> Request:
    """Entry ``i`` of ``unlearning.requests`` as a :class:`Request`.

    >>> parse_request(0, [3, 1]).clients
    (1, 3)
    >>> parse_request(1, {"client": 2, "samples": "backdoor"}).describe()
    'samples of client 2 (backdoor)'
    >>> parse_request(2, {"label": 7}).describe()
    'class 7'
    """
    if isinstance(raw, list):
        if not raw:
            raise RequestSyntaxError(f"entry {i} is empty")
        if not all(_is_int(c) for c in raw):
            raise RequestSyntaxError(f"entry {i} = {raw!r} must list client ids (integers)")
        twice = sorted({c for c in raw if raw.count(c) > 1})
        if twice:
            raise RequestSyntaxError(f"entry {i} names a client twice ({_ids(twice)})")
        return Request("client", clients=tuple(sorted(raw)))
    if not isinstance(raw, dict):
        raise RequestSyntaxError(f"entry {i} = {raw!r} is not a request; write one of {_FORMS}")
    if "label" in raw:
        if set(raw) != {"label"}:
            raise RequestSyntaxError(f"entry {i}: a class request has the key 'label' alone, "
                                     f"got {', '.join(sorted(raw))}")
        if not _is_int(raw["label"]) or raw["label"] < 0:
            raise RequestSyntaxError(f"entry {i}: label = {raw['label']!r} must be a class "
                                     "index (an integer >= 0)")
        return Request("class", label=int(raw["label"]))
    unknown = sorted(set(raw) - _SAMPLE_KEYS)
    if unknown or "client" not in raw:
        raise RequestSyntaxError(
            f"entry {i} = {raw!r}: " + (f"unknown key {', '.join(unknown)}; " if unknown else
                                        "no 'client' or 'label'; ") + f"write one of {_FORMS}")
    client = raw["client"]
    if not _is_int(client):
        raise RequestSyntaxError(f"entry {i}: client = {client!r} must be a client id")
    chosen = [k for k in ("samples", "fraction") if k in raw]
    if not chosen:
        if "seed" in raw:
            raise RequestSyntaxError(f"entry {i}: 'seed' goes with 'fraction'")
        return Request("client", clients=(int(client),))
    if len(chosen) == 2:
        raise RequestSyntaxError(f"entry {i}: give 'samples' or 'fraction', not both")
    if "seed" in raw and "fraction" not in raw:
        raise RequestSyntaxError(f"entry {i}: 'seed' goes with 'fraction'")
    if "fraction" in raw:
        f = raw["fraction"]
        if not (isinstance(f, int | float) and not isinstance(f, bool) and math.isfinite(f)
                and 0 < f <= 1):
            raise RequestSyntaxError(f"entry {i}: fraction = {f!r} must be in (0, 1]")
        seed = raw.get("seed")
        if seed is not None and (not _is_int(seed) or seed < 0):
            raise RequestSyntaxError(f"entry {i}: seed = {seed!r} must be an integer >= 0")
        return Request("samples", clients=(int(client),), fraction=float(f),
                       seed=None if seed is None else int(seed))
    samples = raw["samples"]
    if samples == "backdoor":
        return Request("samples", clients=(int(client),), backdoor=True)
    if not isinstance(samples, list) or not samples or not all(
            _is_int(s) and s >= 0 for s in samples):
        raise RequestSyntaxError(f"entry {i}: samples = {samples!r} must be \"backdoor\" or a "
                                 "non-empty list of sample positions (integers >= 0)")
    twice = sorted({s for s in samples if samples.count(s) > 1}) \
        if len(set(samples)) != len(samples) else []
    if twice:
        raise RequestSyntaxError(f"entry {i} lists sample {twice[0]} twice")
    return Request("samples", clients=(int(client),), indices=tuple(sorted(samples)))


def parse_requests(raw: Sequence[Any], *, num_clients: int,
                   backdoor_clients: Sequence[int]) -> tuple[Request, ...]:
    """Every entry of ``unlearning.requests``, checked against what needs no data: client ids
    in ``0..num_clients-1``, a client not named again once removed whole, backdoor samples only
    of a backdoored client, and at least one client kept."""
    requests = tuple(parse_request(i, r) for i, r in enumerate(raw))
    gone: dict[int, int] = {}
    for i, r in enumerate(requests):
        bad = [c for c in r.clients if not 0 <= c < num_clients]
        if bad:
            raise RequestSyntaxError(f"entry {i} names {_ids(bad)}, which "
                                     f"{'is not a client' if len(bad) == 1 else 'are not clients'}"
                                     f"; use ids in 0..{num_clients - 1}")
        again = sorted(c for c in r.clients if c in gone)
        if again:
            raise RequestSyntaxError(f"entry {i} asks again for {_ids(again)}, already removed "
                                     f"by request {gone[again[0]]}")
        if r.backdoor and r.client not in backdoor_clients:
            raise RequestSyntaxError(f"entry {i} asks for the backdoored samples of client "
                                     f"{r.client}, which holds none (backdoor.clients = "
                                     f"{list(backdoor_clients)})")
        if r.granularity == "client":
            gone.update({c: i for c in r.clients})
    if num_clients and len(gone) >= num_clients:
        raise RequestSyntaxError("would remove every client; keep at least one")
    return requests


def labels(requests: Sequence[Request]) -> list[str]:
    """:meth:`Request.describe` of each request, a repeated one numbered (``class 3 #2``) so
    that every request has its own label in the tables."""
    out: list[str] = []
    for r in requests:
        text = r.describe()
        n = sum(1 for o in requests[:len(out)] if o.describe() == text)
        out.append(text if n == 0 else f"{text} #{n + 1}")
    return out


def granularities(requests: Sequence[Request]) -> set[Granularity]:
    """The granularities a list of requests uses."""
    return {r.granularity for r in requests}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _ids(ids: Sequence[int]) -> str:
    return ("client " if len(ids) == 1 else "clients ") + ", ".join(map(str, ids))
