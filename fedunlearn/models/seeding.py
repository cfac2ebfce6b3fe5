"""The one place where seeds are derived and global RNG state is touched."""

from __future__ import annotations

import random

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A 31-bit seed derived from integers (experiment seed, round, client, purpose).

    >>> derive_seed(0, 1, 2) == derive_seed(0, 1, 2)
    True
    """
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts])
               .generate_state(1)[0] & 0x7FFFFFFF)


def run_seed(seed: int, variant: int) -> int:
    """The seed of a FedAvg run: the experiment's for variant 0, a derived one otherwise.

    >>> run_seed(5, 0)
    5
    """
    return seed if variant == 0 else derive_seed(seed, 0xF1A7, variant)


def variant_tag(variant: int, stream: int = 0) -> int:
    """Seed purpose of local training in a FedAvg run: 0 (the training's own streams) for
    variant 0 and stream 0; a variant run's own; or, for variant 0, fresh client-side streams
    ``stream`` (the noise floor: same initial model and participants, other shuffles).

    >>> variant_tag(0), variant_tag(0, 1) == variant_tag(0, 1) != variant_tag(1) != 0
    (0, True)
    """
    if variant:
        return 0xF1A70 + variant
    return 0 if stream == 0 else derive_seed(0x5EED, stream) + 1


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch global generators (called once per process entry point)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def sample_participants(seed: int, server_round: int, num_clients: int, fraction: float,
                        exclude: frozenset[int] | set[int] = frozenset()) -> list[int]:
    """Clients taking part in ``server_round``: a seeded sample of ``max(1, round(f·K))``.

    Excluded clients are dropped *after* sampling, so a retraining without client u sees
    exactly the original rounds' participants minus u (the reference of every removal).

    >>> sample_participants(0, 1, 4, 1.0, exclude={2})
    [0, 1, 3]
    """
    m = max(1, round(fraction * num_clients))
    rng = np.random.default_rng(derive_seed(seed, server_round, 0x5A3D))
    chosen = sorted(int(c) for c in rng.choice(num_clients, size=m, replace=False))
    return [c for c in chosen if c not in exclude]
