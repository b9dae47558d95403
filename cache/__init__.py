"""The HDF5 feature store shared by both stages: write (atomic, resumable), read, verify."""

from fusebench.cache.format import (
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
from fusebench.cache.integrity import read_rows
from fusebench.cache.merge import MergeError, merge_caches
from fusebench.cache.reader import FeatureStore, parts_dir
from fusebench.cache.sources import (
    StaleCacheError,
    check_fresh,
    ensure_fresh,
    record_sources,
    rewrite_sources,
)
from fusebench.cache.writer import CacheWriter, exclusive_lock, temp_path, write_features

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
