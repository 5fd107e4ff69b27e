"""The layout of a teacher cache: one zarr v3 group per (data manifest, view recipe, seed), in a
folder or under an object-storage prefix (``cache.objects``); the shapes, shards and codecs of
its arrays, and how a new group is made. ``cache.store`` reads and writes it.

Layout (E epochs, R = manifest rows incl. padding, U = epoch blocks, F = record fields)::

    CACHE/zarr.json                  group attributes: schema, views version, manifest / recipe
                                     fingerprints, seed, epochs, epochs_per_unit, k, classes
    CACHE/views/params   int32 [E, R, F]  view records (civt_cache.views layout)
    CACHE/views/keys     uint64 [U, R]    hash of each sample's __key__, per epoch block
    CACHE/views/labels   int32 [U, R]     each sample's label (inspect, alignment checks)
    CACHE/teachers/NAME/ (attrs: arch, checkpoint sha256, normalisation)
        logprobs float16 [E, R, k]   top-k log-probabilities (logit - lse), descending, >= -65504
        indices  int16|int32 [E, R, k]
        lse      float32 [E, R]      log-sum-exp of the full logits (the logits are logprobs + lse)
    CACHE/progress/sSSSSSS-bBBBB.json  commit record of one unit (shard, epoch block): ``cache.commits``
    CACHE/progress/index.json.gz       the records read at start-up in one request
    CACHE/leases/sSSSSSS-bBBBB.gGGGG.json  who computes a unit now (``--claim``; ``cache.leases``)

Every stored object of an array covers exactly one unit (epochs_per_unit epochs x one shard's
rows), so no two processes ever write the same object: the per-epoch arrays are zarr *shards*
of one unit, each holding one inner chunk per epoch (its own CRC32C), so stage two reads only
the epoch it trains on (a ranged read of the shard's index, one of the epoch's chunk). A unit is
committed by writing its objects and then conditionally creating its commit record.
New caches and new teachers are made by writing their array metadata and then conditionally
creating the group's ``zarr.json``, so several processes may race to create them.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec, TransposeCodec

from civt_cache.cache.objects import CacheRoot
from civt_cache.cache.spec import CacheSpec
from civt_cache.views.records import NUM_FIELDS

# Every inner chunk ends in a CRC32C of its compressed bytes (zarr's own v3 codec; the shard
# index has its own), so a flipped bit fails the read instead of decoding into wrong numbers.
_VALUES = [BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.shuffle), Crc32cCodec()]
_BITS = [BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.bitshuffle), Crc32cCodec()]
_RAW = [Crc32cCodec()]
VIEW_ARRAYS = ("views/params", "views/keys", "views/labels")
TEACHER_ARRAYS = ("logprobs", "indices", "lse")


def build_cache(path: Path, spec: CacheSpec) -> None:
    """The empty cache group for ``spec`` at the folder ``path``."""
    g = zarr.open_group(str(path), mode="w", zarr_format=3, attributes=spec.attrs())
    e, r, b = spec.epochs, spec.num_rows, spec.epochs_per_unit
    # fill values say "never written": a crop box of width -1, index -1, lse NaN
    g.create_array("views/params", shape=(e, r, NUM_FIELDS), shards=(b, spec.row_stride, NUM_FIELDS),
                   chunks=(1, spec.row_stride, NUM_FIELDS), dtype="int32", fill_value=-1,
                   filters=[TransposeCodec(order=(0, 2, 1))], compressors=_BITS)
    g.create_array("views/keys", shape=(spec.num_blocks, r), chunks=(1, spec.row_stride),
                   dtype="uint64", fill_value=0, compressors=_RAW)
    g.create_array("views/labels", shape=(spec.num_blocks, r), chunks=(1, spec.row_stride),
                   dtype="int32", fill_value=-1, compressors=_BITS)
    g.require_group("teachers")


def build_teacher(path: Path, spec: CacheSpec, identity: dict[str, Any]) -> None:
    """A teacher's empty group (its identity as attributes) at the folder ``path``."""
    s = spec
    g = zarr.open_group(str(path), mode="w", zarr_format=3, attributes=identity)
    shards, inner = (s.epochs_per_unit, s.row_stride, s.topk), (1, s.row_stride, s.topk)
    g.create_array("logprobs", shape=(s.epochs, s.num_rows, s.topk), shards=shards, chunks=inner,
                   dtype="float16", fill_value=float("nan"), compressors=_VALUES)
    g.create_array("indices", shape=(s.epochs, s.num_rows, s.topk), shards=shards, chunks=inner,
                   dtype=s.index_dtype, fill_value=-1, compressors=_BITS)
    g.create_array("lse", shape=(s.epochs, s.num_rows), shards=shards[:2], chunks=inner[:2],
                   dtype="float32", fill_value=float("nan"), compressors=_VALUES)


def publish(objects: CacheRoot, prefix: str, build: Callable[[Path], None]) -> None:
    """Make a zarr group at ``prefix`` of ``objects``: built by ``build(path)`` in a temp folder,
    its array metadata written, then its ``zarr.json`` created conditionally (last, so a group
    is there only whole); when another process created it first, its group is kept."""
    with tempfile.TemporaryDirectory(prefix="civt-cache-new-") as tmp:
        build(Path(tmp))
        files = sorted(p for p in Path(tmp).rglob("*") if p.is_file())
        top = Path(tmp) / "zarr.json"
        for f in files:
            if f != top:
                objects.write(f"{prefix}{f.relative_to(tmp).as_posix()}", f.read_bytes())
        objects.create(f"{prefix}zarr.json", top.read_bytes())


