"""Split sample indices across federated clients with the Flower Datasets partitioners."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import datasets
    from flwr_datasets.partitioner import Partitioner

PARTITION_SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "pathological")

# Extra Dirichlet draws (each one already retries 10 times inside flwr-datasets) before giving up.
_DIRICHLET_RESEEDS = 5


def _check_inputs(labels: np.ndarray, num_clients: int, scheme: str,
                  min_partition_size: int) -> None:
    """The checks every scheme shares (one ``ValueError`` line each)."""
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be a 1-D integer array, got dtype {labels.dtype} shape {labels.shape}"
        )
    if scheme not in PARTITION_SCHEMES:
        raise ValueError(
            f"unknown partition scheme '{scheme}'; allowed: {', '.join(PARTITION_SCHEMES)}"
        )
    if not 1 <= num_clients <= len(labels):
        raise ValueError(
            f"num_clients={num_clients} must lie in 1..{len(labels)} (the number of samples)"
        )
    if min_partition_size < 0:
        raise ValueError(f"min_partition_size must be >= 0, got {min_partition_size}")


def partition_indices(
    labels: np.ndarray,
    num_clients: int,
    *,
    scheme: str,
    seed: int,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    min_partition_size: int = 1,
) -> list[np.ndarray]:
    """Assign sample indices to clients.

    Parameters
    ----------
    labels : np.ndarray
        1-D integer labels of the pool being partitioned.
    num_clients : int
        Number of clients, ``1 <= num_clients <= len(labels)``.
    scheme : str
        ``"iid"``: a seeded shuffle cut into equal shards (sizes differ by at most 1).
        ``"dirichlet"``: per class, client shares drawn from ``Dirichlet(alpha)``, with
        flwr-datasets' self-balancing (a client above the mean size gets no more samples).
        ``"pathological"``: each client holds exactly ``classes_per_client`` classes, the
        first chosen round-robin (so all classes are used once ``num_clients`` reaches the
        number of classes) and the rest at random; samples of a class are split evenly
        between the clients holding it. Classes no client draws are left out.
    seed : int
        Seed; the same seed and inputs give identical partitions.
    alpha : float, optional
        Dirichlet concentration (``"dirichlet"`` only); smaller means more label skew.
    classes_per_client : int, optional
        Classes per client (``"pathological"`` only).
    min_partition_size : int, optional
        Smallest allowed client size. ``"dirichlet"`` resamples until it holds; the other
        schemes raise ``ValueError`` if it does not.

    Returns
    -------
    list of np.ndarray
        Per client, sorted ``int64`` indices into ``labels``. No index is given to two
        clients; with ``"iid"`` and ``"dirichlet"`` every index is given to exactly one.

    Raises
    ------
    ValueError
        On an unknown scheme, a bad client count, ``alpha <= 0``, or more classes per
        client than the data holds.
    """
    labels = np.asarray(labels)
    _check_inputs(labels, num_clients, scheme, min_partition_size)
    dataset = _as_hf_dataset(labels)
    if scheme == "iid":
        parts = _iid(dataset, num_clients, seed)
    elif scheme == "dirichlet":
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        parts = _dirichlet(dataset, num_clients, seed, float(alpha), min_partition_size)
    else:
        num_present = len(np.unique(labels))
        if classes_per_client < 1:
            raise ValueError(f"classes_per_client must be >= 1, got {classes_per_client}")
        if classes_per_client > num_present:
            raise ValueError(
                f"classes_per_client={classes_per_client} exceeds the {num_present} classes "
                f"in the data; use a value <= {num_present}"
            )
        parts = _pathological(dataset, num_clients, seed, classes_per_client)

    smallest = min(len(p) for p in parts)
    if smallest < min_partition_size:
        raise ValueError(
            f"{scheme} partitioning gave a client only {smallest} samples "
            f"(min_partition_size={min_partition_size}); use fewer clients"
        )
    return parts


def _as_hf_dataset(labels: np.ndarray) -> datasets.Dataset:
    """An in-memory dataset with the label and the original position of every sample."""
    import datasets

    return datasets.Dataset.from_dict(
        {"label": labels.astype(np.int64), "_idx": np.arange(len(labels), dtype=np.int64)}
    )


def _read_back(partitioner: Partitioner, num_clients: int) -> list[np.ndarray]:
    """Original positions held by each partition, sorted."""
    return [
        np.sort(partitioner.load_partition(cid).with_format("numpy")[:]["_idx"].astype(np.int64))
        for cid in range(num_clients)
    ]


def _iid(dataset: datasets.Dataset, num_clients: int, seed: int) -> list[np.ndarray]:
    from flwr_datasets.partitioner import IidPartitioner

    # IidPartitioner cuts contiguous shards without shuffling, so shuffle first.
    partitioner = IidPartitioner(num_partitions=num_clients)
    partitioner.dataset = dataset.shuffle(seed=seed)
    return _read_back(partitioner, num_clients)


def _dirichlet(
    dataset: datasets.Dataset, num_clients: int, seed: int, alpha: float, min_size: int
) -> list[np.ndarray]:
    from flwr_datasets.partitioner import DirichletPartitioner

    for attempt in range(_DIRICHLET_RESEEDS):
        draw_seed = seed if attempt == 0 else _derived_seed(seed, attempt)
        partitioner = DirichletPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min_size,
            self_balancing=True,
            shuffle=False,
            seed=draw_seed,
        )
        partitioner.dataset = dataset
        with warnings.catch_warnings():
            # flwr-datasets warns on every redraw that misses min_partition_size.
            warnings.filterwarnings("ignore", message=".*min_partition_size.*")
            try:
                return _read_back(partitioner, num_clients)
            except ValueError as err:
                if "max number of attempts" not in str(err):
                    raise
    raise ValueError(
        f"dirichlet partitioning could not give each of {num_clients} clients "
        f">= {min_size} samples with alpha={alpha}; raise data.alpha "
        f"or lower data.num_clients"
    )


def _derived_seed(seed: int, attempt: int) -> int:
    """A fresh, reproducible seed for redraw number ``attempt``."""
    return int(np.random.SeedSequence([seed, attempt]).generate_state(1)[0])


def _pathological(
    dataset: datasets.Dataset, num_clients: int, seed: int, classes_per_client: int
) -> list[np.ndarray]:
    from flwr_datasets.partitioner import PathologicalPartitioner

    partitioner = PathologicalPartitioner(
        num_partitions=num_clients,
        partition_by="label",
        num_classes_per_partition=classes_per_client,
        class_assignment_mode="first-deterministic",
        shuffle=False,
        seed=seed,
    )
    partitioner.dataset = dataset
    with warnings.catch_warnings():
        # flwr-datasets warns when some class is drawn by no client; the docstring says so.
        warnings.filterwarnings("ignore", message=".*will NOT be used.*")
        try:
            return _read_back(partitioner, num_clients)
        except ValueError as err:
            if "is needed to be assigned to more partitions" not in str(err):
                raise
    raise ValueError(
        f"pathological partitioning needs more samples per class than the data has for "
        f"{num_clients} clients x {classes_per_client} classes; use fewer clients or classes"
    )
