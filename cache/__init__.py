"""The HDF5 feature store shared by both stages: write (atomic, resumable), read, verify."""

from cache.format import (
    FAILED,
    FORMAT_VERSION,
    OK,
    TODO,
    CacheError,
    CacheLockedError,
    FingerprintMismatchError,
    IncompleteCacheError,
    TokenFeatures,
    fingerprint,
)
from cache.reader import FeatureStore, parts_dir
from cache.writer import CacheWriter, exclusive_lock, temp_path, write_features

__all__ = [
    "FAILED", "FORMAT_VERSION", "OK", "TODO", "CacheError", "CacheLockedError", "CacheWriter",
    "FeatureStore", "FingerprintMismatchError", "IncompleteCacheError", "TokenFeatures",
    "exclusive_lock", "fingerprint", "parts_dir", "temp_path", "write_features",
]
