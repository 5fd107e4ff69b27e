"""civt-cache: run co-advise teachers once, store their top-k logits and exact views in zarr,
and train CivT students from the cache.

Importing the package registers the RedNet and CivT models with timm, so that
``timm.create_model("rednet26")`` and ``timm.create_model("civt_tiny")`` work.
"""
from __future__ import annotations

from . import models  # noqa: F401  (registers rednet* and civt_* with timm)
from .errors import CacheMismatchError, CivtError, ConfigError, ManifestError, ShardError
from .manifest import DataManifest, ShardInfo, load_manifest
from .shards import Sample, iter_shard_file, read_shard

__version__ = "0.1.0"

__all__ = [
    "CacheMismatchError", "CivtError", "ConfigError", "DataManifest", "ManifestError", "Sample",
    "ShardError", "ShardInfo", "iter_shard_file", "load_manifest", "read_shard",
]
