"""A patch-trigger backdoor: stamp, poison a training set, build the triggered test set."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedunlearn.data.dataset import ArrayDataset

if TYPE_CHECKING:
    from fedunlearn.config.tree import Config
    from fedunlearn.data.federated import FederatedData


def stamp_trigger(x: np.ndarray, *, size: int = 2, value: float = 1.0) -> np.ndarray:
    """Return a copy of ``x`` with the trigger stamped on every sample.

    Parameters
    ----------
    x : np.ndarray
        Images ``(N, C, H, W)`` or tabular rows ``(N, D)``.
    size : int, optional
        Images: side of the square patch set in the bottom-right corner of every channel.
        Tabular: number of trailing features set (the last ``size`` columns).
    value : float, optional
        Value written; ``1.0`` is a white patch for images in ``[0, 1]``. On standardised
        tabular data it means one standard deviation above the mean.

    Returns
    -------
    np.ndarray
        The stamped copy; ``x`` itself is not modified.
    """
    out = np.array(x, copy=True)
    if out.ndim == 4:
        height, width = out.shape[2:]
        if not 1 <= size <= min(height, width):
            raise ValueError(f"trigger size must lie in 1..{min(height, width)}, got {size}")
        out[:, :, -size:, -size:] = value
    elif out.ndim == 2:
        if not 1 <= size <= out.shape[1]:
            raise ValueError(f"trigger size must lie in 1..{out.shape[1]}, got {size}")
        out[:, -size:] = value
    else:
        raise ValueError(f"x must be (N, C, H, W) images or (N, D) rows, got shape {out.shape}")
    return out


def poison(
    ds: ArrayDataset, *, fraction: float, target_class: int, seed: int, size: int = 2
) -> tuple[ArrayDataset, np.ndarray]:
    """Stamp the trigger on a random share of ``ds`` and relabel those samples as the target.

    Samples are drawn from the whole of ``ds``, so some may already be of the target class.

    Parameters
    ----------
    ds : ArrayDataset
        Clean samples (typically one malicious client's data).
    fraction : float
        Share of samples to poison, in ``[0, 1]``; exactly ``round(fraction * len(ds))``.
    target_class : int
        Label the backdoor should map triggered inputs to.
    seed : int
        Seed of the choice of samples.
    size : int, optional
        Trigger size, see :func:`stamp_trigger`.

    Returns
    -------
    tuple of (ArrayDataset, np.ndarray)
        The poisoned copy of ``ds`` and the sorted ``int64`` positions that were poisoned.
        Samples at other positions are unchanged.
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    _check_target(target_class, ds.num_classes)
    count = round(fraction * len(ds))
    rng = np.random.default_rng(seed)
    positions = np.sort(rng.choice(len(ds), size=count, replace=False)).astype(np.int64)
    x = ds.x.copy()
    y = ds.y.copy()
    if count:
        x[positions] = stamp_trigger(ds.x[positions], size=size)
        y[positions] = target_class
    return ArrayDataset(x, y, ds.num_classes, ds.name), positions


def triggered_test_set(test: ArrayDataset, target_class: int, size: int = 2) -> ArrayDataset:
    """Stamp the trigger on every test sample whose true class is not the target.

    Labels keep the **true** class. The attack success rate (ASR) is the share of this set
    a model predicts as ``target_class``; plain accuracy on it measures robustness instead.

    Parameters
    ----------
    test : ArrayDataset
        Clean held-out samples.
    target_class : int
        The backdoor's target label; samples of this class are dropped.
    size : int, optional
        Trigger size, see :func:`stamp_trigger`.

    Returns
    -------
    ArrayDataset
        The stamped non-target samples with their true labels.
    """
    _check_target(target_class, test.num_classes)
    keep = np.flatnonzero(test.y != target_class)
    x = stamp_trigger(test.x[keep], size=size)
    name = f"{test.name}+trigger" if test.name else "trigger"
    return ArrayDataset(x, test.y[keep], test.num_classes, name)


@dataclass(frozen=True, eq=False)
class Trigger:
    """A trigger as the features it writes: ``values`` at the ``mask`` of a flattened sample.

    Recovered from a clean set and its stamped copy (:meth:`recover`), so code that holds only
    the data (not the backdoor config) can stamp new samples with the same trigger and tell
    which samples carry it.

    Attributes
    ----------
    mask : np.ndarray
        Boolean, one entry per feature of a flattened sample; True where the trigger writes.
    values : np.ndarray
        The values written, in the order of ``np.flatnonzero(mask)``.
    """

    mask: np.ndarray
    values: np.ndarray

    @classmethod
    def recover(cls, clean: np.ndarray, stamped: np.ndarray) -> Trigger:
        """The features every stamped sample has equal and at least one sample changed.

        ``stamped`` must be ``clean`` with one trigger stamped on every sample (same order),
        e.g. ``triggered_test_set(test, t).x`` and the non-target rows of ``test.x``. With no
        rows, or no changed feature, the trigger is empty and :meth:`carried_by` is all False.

        >>> clean = np.array([[0.2, 0.0, 0.3], [0.5, 0.1, 1.0]])
        >>> t = Trigger.recover(clean, stamp_trigger(clean, size=2))
        >>> t.mask, t.values
        (array([False,  True,  True]), array([1., 1.], dtype=float32))
        """
        flat_clean, flat = _rows(np.asarray(clean)), _rows(np.asarray(stamped, np.float32))
        if flat.shape != flat_clean.shape:
            raise ValueError(f"Trigger.recover: stamped {flat.shape} and clean "
                             f"{flat_clean.shape} must hold the same samples")
        if len(flat) == 0:
            return cls(np.zeros(flat.shape[1], dtype=bool), np.zeros(0, dtype=np.float32))
        mask = np.all(flat == flat[0], axis=0) & np.any(flat != flat_clean, axis=0)
        return cls(mask, flat[0, mask])

    def stamp(self, x: np.ndarray) -> np.ndarray:
        """A copy of ``x`` with the trigger written on every sample (``x`` is not modified).

        >>> Trigger(np.array([False, True]), np.array([1.0])).stamp(np.zeros((1, 2)))
        array([[0., 1.]])
        """
        out = np.array(x, copy=True)
        flat = _rows(out)
        flat[:, self.mask] = self.values
        return flat.reshape(out.shape)

    def carried_by(self, x: np.ndarray) -> np.ndarray:
        """Boolean per sample: does it hold the trigger's values at the trigger's features?

        A clean sample that happens to hold them equals its own stamped copy, so it counts as
        carrying the trigger. An empty trigger is carried by no sample.

        >>> Trigger(np.array([False, True]), np.array([1.0])).carried_by(np.eye(2))
        array([False,  True])
        """
        flat = _rows(np.asarray(x))
        if not self.mask.any():
            return np.zeros(len(flat), dtype=bool)
        return np.all(flat[:, self.mask] == self.values, axis=1)


def _rows(x: np.ndarray) -> np.ndarray:
    """``x`` as one flattened row per sample (a view when possible; works with 0 samples)."""
    return x.reshape(len(x), int(np.prod(x.shape[1:], dtype=np.int64)))


def _check_target(target_class: int, num_classes: int) -> None:
    if not 0 <= target_class < num_classes:
        raise ValueError(f"target_class must lie in 0..{num_classes - 1}, got {target_class}")


def clean_samples(cfg: Config, data: FederatedData, client: int) -> np.ndarray:
    """Boolean per sample of client ``client``'s data: True where the backdoor did not poison it.

    The data keeps no list of the poisoned positions (:func:`fedunlearn.data.backdoor.poison`
    returns them, :func:`~fedunlearn.data.federated.build_federated_data` drops them), so a
    backdoored client (one of ``backdoor.clients``) tells its poisoned samples as the
    verifier does: they carry the trigger (recovered from the test split and its triggered
    copy, :meth:`~fedunlearn.data.backdoor.Trigger.recover`) *and* the target label. Any other
    client's samples are all clean.
    """
    local = data.clients[client]
    bd = cfg.backdoor
    if client not in bd.clients or data.triggered_test is None:
        return np.ones(len(local), dtype=bool)
    trigger = Trigger.recover(data.test.x[data.test.y != bd.target_class],
                              data.triggered_test.x)
    return ~(trigger.carried_by(local.x) & (local.y == bd.target_class))
