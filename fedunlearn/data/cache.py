"""A copy of the built federated data, written by the driver for client processes on the same
machine, so Flower's client processes do not rebuild it.

Every client process derives its data from the config (:func:`build_federated_data`): import
scikit-learn and flwr-datasets, load the source, split, partition, poison. That is seconds per
process (docs/benchmarks.md, "Figures from docstrings"), paid by every Ray actor when the engine
starts, while the driver has built the very
same data already. The driver writes it once per job (:func:`publish`) into the directory named
by the environment variable :data:`ENV`, which Ray's local processes inherit; a client process
loads it (:func:`load`, ``np.load`` without pickle) and falls back to building the data when
there is no copy (a worker on another node of a cluster, or no variable set). The copy is
keyed by the SHA-256 of the job (the whole config), so a different config never reads it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from fedunlearn.data.dataset import ArrayDataset
from fedunlearn.data.federated import FederatedData

ENV = "FEDUNLEARN_DATA_CACHE"
"""Names the directory of the copies; set by the driver for the processes it starts."""


def _path(directory: str | Path, job: str) -> Path:
    return Path(directory) / f"data-{hashlib.sha256(job.encode()).hexdigest()[:32]}.npz"


def publish(data: FederatedData, job: str, directory: str | Path | None = None) -> Path | None:
    """Write ``data`` for ``job`` into ``directory`` (default: ``$FEDUNLEARN_DATA_CACHE``);
    return the file, or None when no directory is set. An existing copy is kept."""
    directory = directory or os.environ.get(ENV)
    if not directory:
        return None
    path = _path(directory, job)
    if path.exists():
        return path
    arrays: dict[str, np.ndarray] = {}
    parts = {"test": data.test, "server": data.server}
    if data.triggered_test is not None:
        parts["triggered_test"] = data.triggered_test
    parts.update({f"client{k}": d for k, d in enumerate(data.clients)})
    for name, d in parts.items():
        arrays[f"{name}.x"], arrays[f"{name}.y"] = d.x, d.y
    meta = {"clients": len(data.clients), "num_classes": data.num_classes,
            "input_shape": list(data.input_shape), "triggered": data.triggered_test is not None,
            "names": {name: d.name for name, d in parts.items()}}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)  # readers see the whole file or none
    return path


def load(job: str, directory: str | Path | None = None) -> FederatedData | None:
    """The copy of ``job``'s data, or None when there is none (or it cannot be read)."""
    directory = directory or os.environ.get(ENV)
    if not directory:
        return None
    path = _path(directory, job)
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            k = int(meta["num_classes"])

            def part(name: str) -> ArrayDataset:
                return ArrayDataset(z[f"{name}.x"], z[f"{name}.y"], k, meta["names"][name])

            return FederatedData(
                clients=[part(f"client{i}") for i in range(int(meta["clients"]))],
                test=part("test"), server=part("server"),
                triggered_test=part("triggered_test") if meta["triggered"] else None,
                num_classes=k, input_shape=tuple(int(d) for d in meta["input_shape"]))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
