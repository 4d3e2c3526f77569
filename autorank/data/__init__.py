"""Data stage: `load_data(spec)` turns a `--data` spec into decoded, split, cached uint8 tensors."""

from autorank.data.dataset import Dataset, augment_batch
from autorank.data.sources import default_cache_dir, load_data

__all__ = ["Dataset", "augment_batch", "default_cache_dir", "load_data"]
