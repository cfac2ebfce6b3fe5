"""The federated view of one dataset: per-client training partitions, test and server splits.

Built deterministically from the config, so the server and every Flower client process derive
exactly the same partitions without shipping data around.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedunlearn.config.tree import Config
from fedunlearn.data.backdoor import poison, triggered_test_set
from fedunlearn.data.dataset import ArrayDataset
from fedunlearn.data.partition import partition_indices
from fedunlearn.data.sources import load_source
from fedunlearn.data.splits import train_test_server_split
from fedunlearn.models.seeding import derive_seed


@dataclass(frozen=True)
class FederatedData:
    """Everything an experiment trains and evaluates on.

    Attributes
    ----------
    clients : list of ArrayDataset
        Training data of client ``k`` at index ``k`` (backdoored clients already poisoned).
    test : ArrayDataset
        Held-out test split.
    server : ArrayDataset
        The server's split; unlearning methods use its inputs only (unlabeled).
    triggered_test : ArrayDataset or None
        Test inputs of non-target classes with the trigger stamped (labels are the true
        classes), present when a backdoor is configured.
    """

    clients: list[ArrayDataset]
    test: ArrayDataset
    server: ArrayDataset
    triggered_test: ArrayDataset | None
    num_classes: int
    input_shape: tuple[int, ...]

    def pooled(self, exclude: frozenset[int] | set[int] = frozenset()) -> ArrayDataset:
        """All clients' training data pooled at one site, minus ``exclude``."""
        parts = [d for k, d in enumerate(self.clients) if k not in exclude]
        return ArrayDataset(x=np.concatenate([p.x for p in parts]),
                            y=np.concatenate([p.y for p in parts]),
                            num_classes=self.num_classes, name="pooled")

    def owners(self, exclude: frozenset[int] | set[int] = frozenset()) -> np.ndarray:
        """The client of each sample of :meth:`pooled` (same ``exclude``, same order)."""
        kept = [k for k in range(len(self.clients)) if k not in exclude]
        return np.repeat(np.array(kept, dtype=np.int64),
                         [len(self.clients[k]) for k in kept])


def build_federated_data(cfg: Config) -> FederatedData:
    """Load the source, split it, partition over clients and plant the backdoor, all seeded."""
    d = cfg.data
    seed = cfg.seed
    full = load_source(d.source, seed=derive_seed(seed, 1), **d.source_params)
    train, test, server = train_test_server_split(
        full, test_fraction=d.test_fraction, server_fraction=d.server_fraction,
        seed=derive_seed(seed, 2))
    parts = partition_indices(train.y, d.num_clients, scheme=d.partition,
                              seed=derive_seed(seed, 3), alpha=d.alpha,
                              classes_per_client=d.classes_per_client)
    clients = [train.subset(idx) for idx in parts]
    bd = cfg.backdoor
    triggered = None
    if bd.clients:
        if bd.target_class >= full.num_classes:
            from fedunlearn.config.tree import ConfigError
            raise ConfigError(f"config key 'backdoor.target_class' = {bd.target_class} exceeds "
                              f"the {full.num_classes} classes; use 0..{full.num_classes - 1}")
        for k in bd.clients:
            clients[k], _ = poison(clients[k], fraction=bd.fraction, target_class=bd.target_class,
                                   seed=derive_seed(seed, 4, k), size=bd.trigger_size)
        triggered = triggered_test_set(test, bd.target_class, size=bd.trigger_size)
    return FederatedData(clients=clients, test=test, server=server, triggered_test=triggered,
                         num_classes=full.num_classes, input_shape=full.input_shape)
