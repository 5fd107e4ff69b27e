"""Feeding a student: shard order and rank shares, the batches of samples with their cached
records and targets, the device-side batch (decode, views, soft targets) and its prefetch, and
the public ``CachedBatches``. Reads the cache; never writes it."""
