"""The in-memory dataset every other part of the framework passes around."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """A labelled dataset held as two NumPy arrays.

    Arrays are coerced on construction: ``x`` to ``float32`` and ``y`` to ``int64``.
    Equality is identity (``eq=False``), since element-wise array comparison has no
    single truth value.

    Parameters
    ----------
    x : np.ndarray
        Features, ``float32``. Images are ``(N, C, H, W)`` scaled to ``[0, 1]``;
        tabular data is ``(N, D)``.
    y : np.ndarray
        Integer labels in ``0 .. num_classes - 1``, shape ``(N,)``.
    num_classes : int
        Number of classes of the task (not necessarily all present in ``y``).
    name : str, optional
        Human-readable name used in logs and reports.
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    name: str = ""

    def __post_init__(self) -> None:
        x = np.asarray(self.x, dtype=np.float32)
        raw = np.asarray(self.y)
        if raw.dtype.kind == "f" and not np.array_equal(raw, np.round(raw)):
            raise ValueError("labels y must be class indices 0, 1, ...; got non-integral "
                             f"values such as {raw[raw != np.round(raw)][0]}")
        try:
            y = raw.astype(np.int64)
        except ValueError:
            raise ValueError("labels y must be class indices 0, 1, ...; got "
                             f"{raw.dtype} values such as {raw.ravel()[0]!r} (map names to "
                             "indices, e.g. names, y = np.unique(y, return_inverse=True))"
                             ) from None
        if x.ndim < 2:
            raise ValueError(f"x must be at least 2-D (N, ...), got shape {x.shape}")
        if y.ndim != 1:
            raise ValueError(f"y must be 1-D (N,), got shape {y.shape}")
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)} labels")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if y.size and (y.min() < 0 or y.max() >= self.num_classes):
            raise ValueError(
                f"labels must lie in 0..{self.num_classes - 1}, got {y.min()}..{y.max()}"
            )
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __repr__(self) -> str:
        return (
            f"ArrayDataset(name={self.name!r}, n={len(self)}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes})"
        )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, i.e. ``x.shape[1:]``."""
        return tuple(int(d) for d in self.x.shape[1:])

    def subset(self, indices: np.ndarray) -> ArrayDataset:
        """Return a new dataset holding copies of the samples at ``indices``.

        Parameters
        ----------
        indices : np.ndarray
            1-D integer positions into this dataset (may be empty).

        Returns
        -------
        ArrayDataset
            The selected samples, same ``num_classes`` and ``name``.
        """
        idx = np.asarray(indices)
        if idx.size == 0:
            idx = idx.astype(np.int64)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(
                f"indices must be a 1-D integer array, got dtype {idx.dtype} shape {idx.shape}"
            )
        return ArrayDataset(self.x[idx], self.y[idx], self.num_classes, self.name)
