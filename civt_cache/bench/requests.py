"""``civt-cache bench requests CACHE``: what a cache in object storage costs in requests and bytes.

For an ``s3://`` cache it counts, through s3fs (every request of the cache's own code and of
zarr's ``FsspecStore`` goes through it), the objects per unit, the requests a start-up makes
(reading the commit records alone; and the records plus a listing of every array's objects, as
stage two's check, stage one's plan and ``inspect`` do), and the bytes stage two reads for one epoch against the bytes that epoch stores, so the
numbers extrapolate to any cache's shape (requests grow with units / 1,000, bytes with rows).
"""
from __future__ import annotations

import collections
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from civt_cache.cache.layout import SAMPLES
from civt_cache.cache.scan import scan_cache
from civt_cache.cache.store import CacheStore
from civt_cache.errors import ConfigError


@contextmanager
def counted_requests() -> Iterator[dict[str, Any]]:
    """Count S3 requests by method and the bytes of object reads while the block runs."""
    import s3fs

    seen: dict[str, Any] = {"calls": collections.Counter(), "bytes": 0}
    call, cat = s3fs.S3FileSystem._call_s3, s3fs.S3FileSystem._cat_file

    async def counting_call(self, method, *args, **kwargs):  # noqa: ANN001, ANN202 - s3fs's own
        seen["calls"][method] += 1
        return await call(self, method, *args, **kwargs)

    async def counting_cat(self, path, *args, **kwargs):  # noqa: ANN001, ANN202
        out = await cat(self, path, *args, **kwargs)
        seen["bytes"] += len(out)
        return out

    s3fs.S3FileSystem._call_s3, s3fs.S3FileSystem._cat_file = counting_call, counting_cat
    try:
        yield seen
    finally:
        s3fs.S3FileSystem._call_s3, s3fs.S3FileSystem._cat_file = call, cat


def bench_requests(cache: str) -> str:
    """The report (see the module docstring)."""
    if not cache.startswith("s3://"):
        raise ConfigError(f"bench requests: {cache}: counts S3 requests, so it needs an s3:// cache")
    store = CacheStore.open(cache)
    units, teachers = store.units(), list(store.teachers())
    listed = store.objects.listing("")
    arrays = [k for k in listed if "/c/" in f"/{k}"]
    stored = sum(listed[k][1] for k in arrays)
    records = store.commits.all()
    lines = [f"{cache}: {store.spec.num_shards} shards x {store.spec.epochs} epochs, "
             f"{store.spec.epochs_per_unit} per unit = {len(units)} units, {len(teachers)} teacher(s)",
             f"  objects: {len(listed)} in all, {len(arrays) / len(units):.1f} array objects per unit "
             f"+ 1 commit record; {stored:,} array bytes"]
    scans: list[tuple[str, Callable[[CacheStore], Any]]] = [
        ("the records (a listing + the index: --claim's rounds)", lambda s: scan_cache(s, chunks=False)),
        ("stage two's check, stage one's plan, inspect (records + every object)", lambda s: scan_cache(s))]
    for name, scan in scans:
        with counted_requests() as seen:
            scan(CacheStore.open(cache))
        lines.append(f"  start-up, {name}: {sum(seen['calls'].values())} requests "
                     f"({', '.join(f'{k} {v}' for k, v in sorted(seen['calls'].items()))})")
    epoch = min(1, store.spec.epochs - 1)
    done = [u for u in units if u[1] == epoch // store.spec.epochs_per_unit and u in records]
    for shard, block in done:  # each array's metadata is read once per process: not per epoch
        store.read_epoch(shard, epoch, records[(shard, block)], teachers)
    with counted_requests() as seen:
        for shard, block in done:
            store.read_epoch(shard, epoch, records[(shard, block)], teachers)
    # the bytes of the epoch's objects: every array but the per-block samples (stage two checks
    # its shard against their checksum in the commit record, reading none of them)
    per_epoch = sum(listed[k][1] for k in arrays if not k.startswith(f"{SAMPLES}/"))
    used = per_epoch / store.spec.epochs * len(done) / store.spec.num_shards
    lines.append(f"  stage two, epoch {epoch} of {len(done)} shard(s): {seen['bytes']:,} bytes read in "
                 f"{sum(seen['calls'].values())} requests; the cache stores {used:,.0f} bytes per epoch "
                 f"of them: read / stored {seen['bytes'] / max(used, 1):.2f}")
    return "\n".join(lines)
