"""The HDF5 feature store shared by both stages: write (atomic, resumable), read, verify."""

from cache.format import (
    FAILED,
    FORMAT_VERSION,
    OK,
    TODO,
    CacheError,
    CacheLockedError,
    CacheWriteError,
    DamagedCacheError,
    FingerprintMismatchError,
    IncompleteCacheError,
    TokenFeatures,
    fingerprint,
)
from cache.integrity import read_rows
from cache.merge import MergeError, merge_caches
from cache.reader import FeatureStore, parts_dir
from cache.sources import (
    StaleCacheError,
    check_fresh,
    ensure_fresh,
    record_sources,
    rewrite_sources,
)
from cache.writer import CacheWriter, exclusive_lock, temp_path, write_features

__all__ = [
    "FAILED",
    "FORMAT_VERSION",
    "OK",
    "TODO",
    "CacheError",
    "CacheLockedError",
    "CacheWriteError",
    "CacheWriter",
    "DamagedCacheError",
    "FeatureStore",
    "FingerprintMismatchError",
    "IncompleteCacheError",
    "MergeError",
    "StaleCacheError",
    "TokenFeatures",
    "check_fresh",
    "ensure_fresh",
    "exclusive_lock",
    "fingerprint",
    "merge_caches",
    "parts_dir",
    "read_rows",
    "record_sources",
    "rewrite_sources",
    "temp_path",
    "write_features",
]
