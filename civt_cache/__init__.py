"""civt-cache: run co-advise teachers once, store their top-k logits and exact views in zarr,
and train CivT students from the cache.

Importing the package registers the RedNet and CivT models with timm, so that
``timm.create_model("rednet26")`` and ``timm.create_model("civt_tiny")`` work.

For one's own training loop: ``CachedBatches`` (views and soft targets from a manifest and a
cache, on the device), and the view engine's steps: ``sample_records`` (a shard's records),
``decode_images`` and ``render_views`` under a ``Recipe``.
"""
from __future__ import annotations

from civt_cache.data.manifest import DataManifest, ShardInfo, load_manifest
from civt_cache.data.shards import Sample, iter_shard_file, read_shard
from civt_cache.errors import CacheMismatchError, CivtError, ConfigError, ManifestError, ShardError
from civt_cache.loader.cached import CachedBatches
from civt_cache.views.engine import decode_images, render_views
from civt_cache.views.recipe import Recipe
from civt_cache.views.records import sample_shard_records as sample_records

from . import models  # noqa: F401  (registers rednet* and civt_* with timm)

__version__ = "0.1.0"

__all__ = [
    "CacheMismatchError", "CachedBatches", "CivtError", "ConfigError", "DataManifest", "ManifestError",
    "Recipe", "Sample", "ShardError", "ShardInfo", "decode_images", "iter_shard_file", "load_manifest",
    "read_shard", "render_views", "sample_records",
]
