"""Data stage: `load_data(spec)` turns a `--data` spec into decoded, split, cached uint8 tensors."""

from autorank.data.dataset import Dataset
from autorank.data.sources import load_data

__all__ = ["Dataset", "load_data"]
