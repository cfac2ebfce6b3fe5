"""Datasets, client partitions, train/test/server splits and backdoor poisoning."""

from fedunlearn.data.backdoor import poison, stamp_trigger, triggered_test_set
from fedunlearn.data.dataset import ArrayDataset
from fedunlearn.data.partition import PARTITION_SCHEMES, partition_indices
from fedunlearn.data.sources import SOURCES, hf_to_arrays, load_source, register_source
from fedunlearn.data.splits import train_test_server_split

__all__ = [
    "PARTITION_SCHEMES",
    "SOURCES",
    "ArrayDataset",
    "hf_to_arrays",
    "load_source",
    "partition_indices",
    "poison",
    "register_source",
    "stamp_trigger",
    "train_test_server_split",
    "triggered_test_set",
]
