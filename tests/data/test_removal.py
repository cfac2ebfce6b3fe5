"""What each request removes (fedunlearn/data/removal.py), checked against sets computed here
by hand from the data: positions, fractions, the backdoor's poisoned samples, classes, and what
a later request sees of what the earlier ones left."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import small_config

from fedunlearn.data.backdoor import clean_samples
from fedunlearn.data.federated import build_federated_data
from fedunlearn.data.removal import (
    FRACTION_STREAM,
    RemovalError,
    forget_set,
    pooled_ids,
    resolve,
    retain_set,
    retained_mask,
)
from fedunlearn.models.seeding import derive_seed

BD = ["backdoor.clients=[1]", "backdoor.fraction=0.5"]


def _setup(requests: str, *extra: str):
    cfg = small_config(f"unlearning.requests={requests}", *BD, *extra)
    return cfg, build_federated_data(cfg)


def test_positions_fraction_backdoor_and_class_remove_what_they_name() -> None:
    cfg, data = _setup('[{client = 0, samples = [5, 1]}, {client = 2, fraction = 0.3},'
                       ' {client = 1, samples = "backdoor"}, {label = 4}]')
    s0, s1, s2, s3 = resolve(cfg, data)
    assert s0.forget.keys() == {0} and s0.forget[0].tolist() == [1, 5]
    n2 = len(data.clients[2])
    rng = np.random.default_rng(derive_seed(cfg.seed, FRACTION_STREAM, 1))
    drawn = np.sort(rng.choice(np.arange(n2), size=round(0.3 * n2), replace=False))
    assert s1.forget[2].tolist() == drawn.tolist()
    poisoned = np.flatnonzero(~clean_samples(cfg, data, 1))
    assert len(poisoned) > 0 and s2.forget[1].tolist() == poisoned.tolist()
    for c, d in enumerate(data.clients):  # class 4, minus what earlier requests took
        earlier = s2.removed.get(c, np.zeros(len(d), bool))
        expect = np.flatnonzero((d.y == 4) & ~earlier)
        assert s3.forget.get(c, np.array([], int)).tolist() == expect.tolist()
    assert s3.gone == frozenset() and s3.partial
    # the retained masks are the complement of everything removed so far
    mask = retained_mask((s0, s1, s2, s3), 0, 4, len(data.clients[0]))
    assert mask is not None and not mask[[1, 5]].any()
    assert not (data.clients[0].y[mask] == 4).any()
    assert retained_mask((s0, s1, s2, s3), 3, 1, len(data.clients[3])) is None
    # forget and retain sets partition what was there
    total = sum(len(d) for d in data.clients)
    assert sum(s.num_forgotten for s in (s0, s1, s2, s3)) + len(retain_set(data, s3)) == total
    assert len(forget_set(data, s3)) == s3.num_forgotten


def test_a_later_request_sees_what_the_earlier_ones_left() -> None:
    cfg, data = _setup("[{client = 0, samples = [0, 1, 2]}, {client = 0, fraction = 1.0},"
                       " [1], {label = 3}]")
    _, s1, s2, s3 = resolve(cfg, data)
    n0 = len(data.clients[0])
    assert s1.forget[0].tolist() == list(range(3, n0))  # all that was left
    assert 0 in s1.gone  # emptied: out of the federation
    assert s2.forget[1].tolist() == list(range(len(data.clients[1]))) and s2.gone == {0, 1}
    assert set(s3.forget) <= {2, 3}  # a class request skips clients already out


def test_a_seed_of_its_own_draws_other_samples_and_repeats() -> None:
    cfg, data = _setup("[{client = 2, fraction = 0.5, seed = 11}]")
    again = resolve(cfg, data)[0].forget[2]
    assert resolve(cfg, data)[0].forget[2].tolist() == again.tolist()
    other, _ = _setup("[{client = 2, fraction = 0.5, seed = 12}]")
    assert resolve(other, data)[0].forget[2].tolist() != again.tolist()


@pytest.mark.parametrize(("requests", "says"), [
    ("[{client = 0, samples = [100000]}]", "asks for sample 100000 of client 0, which holds"),
    ("[{client = 0, samples = [1]}, {client = 0, samples = [1, 2]}]",
     "sample 1 of client 0, already removed by an earlier request"),
    ("[{label = 10}]", "label = 10 is not a class of the data (0..9)"),
    ("[{label = 2}, {label = 2}]", "entry 1 (class 2) removes nothing"),
    ('[{client = 1, samples = "backdoor"}, {client = 1, samples = "backdoor"}]',
     "holds no poisoned sample (none was poisoned, or all are removed)"),
    ("[{client = 0, samples = [9223372036854775808]}]",
     "asks for sample 9223372036854775808 of client 0, which holds"),
    ("[{client = 0, fraction = 1.0}, {client = 0, samples = [0]}]",
     "client 0, which no longer holds any"),
    (("[{client = 0, fraction = 1.0}, {client = 1, fraction = 1.0},"
      " {client = 2, fraction = 1.0}, {client = 3, fraction = 1.0}]"),
     "would leave no client with any sample"),
])
def test_a_request_that_does_not_fit_the_data_is_one_line(requests: str, says: str) -> None:
    cfg, data = _setup(requests)
    with pytest.raises(RemovalError) as err:
        resolve(cfg, data)
    assert says in str(err.value) and "\n" not in str(err.value), err.value


def test_pooled_ids_point_at_the_same_samples_in_the_pool() -> None:
    cfg, data = _setup("[{client = 2, samples = [0, 7]}, {label = 5}]")
    pool = data.pooled()
    for step in resolve(cfg, data):
        ids = pooled_ids(data, step.forget)
        expect_x = np.concatenate([data.clients[c].x[idx] for c, idx in sorted(step.forget.items())])
        expect_y = np.concatenate([data.clients[c].y[idx] for c, idx in sorted(step.forget.items())])
        assert np.array_equal(pool.x[ids], expect_x) and np.array_equal(pool.y[ids], expect_y)
        assert len(np.unique(ids)) == step.num_forgotten
    # by hand: client 2's sample 7 sits after clients 0 and 1 in the pool
    offset = len(data.clients[0]) + len(data.clients[1])
    assert pooled_ids(data, {2: np.array([7])}).tolist() == [offset + 7]
