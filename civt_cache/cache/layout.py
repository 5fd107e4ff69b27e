"""The layout of a teacher cache: one zarr v3 group per (data manifest, view recipe, seed), in a
folder or under an object-storage prefix (``cache.objects``); the shapes, shards and codecs of
its arrays, and how a new group is made. ``cache.store`` reads and writes it.

Layout (E epochs, R = manifest rows incl. padding, U = epoch blocks, F = record fields)::

    CACHE/zarr.json                  group attributes: schema, views version, manifest / recipe
                                     fingerprints, seed, epochs, epochs_per_unit, k, classes
    CACHE/views/params   int32 [E, R, F]  view records (civt_cache.views layout)
    CACHE/views/samples  uint64 [U, R, 2] per epoch block: hash of each sample's __key__, its
                                          label (inspect, alignment checks)
    CACHE/teachers/NAME/ (attrs: arch, checkpoint sha256, normalisation)
        targets  float32 [E, R, 2k+1]  per view: top-k log-probabilities (logit - lse; float16
                                       values, >= -65504), descending; their k class indices;
                                       the log-sum-exp of all logits (logits = logprobs + lse)
    CACHE/progress/sSSSSSS-bBBBB.json  commit record of one unit (shard, epoch block): ``cache.commits``
    CACHE/progress/index.json.gz       the records read at start-up in one request
    CACHE/leases/sSSSSSS-bBBBB.gGGGG.json  who computes a unit now (``--claim``; ``cache.leases``)

A unit is 2 + T objects (T teachers) and its commit record: what a view needs from one teacher
is one float32 row, because float16 log-probabilities, class indices below 2**24 and a float32
lse are all exact in float32; stored field-major and shuffled, the zeros that the narrower
values leave in float32 compress away (within ~2 bytes a view of three separate arrays).

Every stored object of an array covers exactly one unit (epochs_per_unit epochs x one shard's
rows), so no two processes ever write the same object: the per-epoch arrays are zarr *shards*
of one unit, each holding one inner chunk per epoch (its own CRC32C), so stage two reads only
the epoch it trains on (a ranged read of the shard's index, one of the epoch's chunk). A unit is
committed by writing its objects and then conditionally creating its commit record.
New caches and new teachers are made by writing their array metadata and then conditionally
creating the group's ``zarr.json``, so several processes may race to create them; one that
raced with other settings is refused, and so is the winner if the loser's array metadata
landed over its own (``layout_differences``).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec, TransposeCodec

from civt_cache.cache.objects import CacheRoot
from civt_cache.cache.spec import FP16_LOWEST, CacheSpec
from civt_cache.views.records import NUM_FIELDS

# Every inner chunk ends in a CRC32C of its compressed bytes (zarr's own v3 codec; the shard
# index has its own), so a flipped bit fails the read instead of decoding into wrong numbers.
_BITS = [BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.bitshuffle), Crc32cCodec()]
_BYTES = [BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.shuffle), Crc32cCodec()]
_TARGETS = [BloscCodec(cname="zstd", clevel=9, shuffle=BloscShuffle.shuffle), Crc32cCodec()]
_FIELD_MAJOR = [TransposeCodec(order=(0, 2, 1))]  # a record's fields lie together when shuffled
PARAMS = "views/params"  # [epoch, row, field]: each view's record
SAMPLES = "views/samples"  # [block, row, 2]: each row's key hash and label, per unit
VIEW_ARRAYS = (PARAMS, SAMPLES)
TEACHER_ARRAYS = ("targets",)
NO_SAMPLE = np.iinfo(np.uint64).max  # samples' fill value: no key hashes to it, no label is it


def _view_arrays(spec: CacheSpec) -> dict[str, dict[str, Any]]:
    """The views' arrays of a cache for ``spec``: name -> ``zarr.create_array`` settings. Fill
    values say "never written": a crop box of width -1, a sample hash and label of 2**64-1."""
    e, r, b, stride = spec.epochs, spec.num_rows, spec.epochs_per_unit, spec.row_stride
    return {PARAMS: dict(shape=(e, r, NUM_FIELDS), shards=(b, stride, NUM_FIELDS),
                         chunks=(1, stride, NUM_FIELDS), dtype="int32", fill_value=-1,
                         filters=_FIELD_MAJOR, compressors=_BITS),
            SAMPLES: dict(shape=(spec.num_blocks, r, 2), shards=None, chunks=(1, stride, 2),
                          dtype="uint64", fill_value=int(NO_SAMPLE), filters=_FIELD_MAJOR,
                          compressors=_BYTES)}


def build_cache(path: Path, spec: CacheSpec) -> None:
    """The empty cache group for ``spec`` at the folder ``path``."""
    g = zarr.open_group(str(path), mode="w", zarr_format=3, attributes=spec.attrs())
    for name, settings in _view_arrays(spec).items():
        g.create_array(name, **settings)
    g.require_group("teachers")


def layout_differences(group: zarr.Group, spec: CacheSpec) -> list[str]:
    """How the stored views' arrays differ from those of a cache for ``spec`` (the group's own
    attributes). Two processes that create one cache with different settings at once both
    write array metadata before one of them creates the group, so the winner's arrays may be
    the loser's; its first writes would land in the wrong shapes. An array may hold more
    epochs than the attributes say: a cache being grown resizes its arrays first."""
    out = []
    for name, want in _view_arrays(spec).items():
        a = group[name]
        grid = want["shards"] or want["chunks"]
        if (a.shape[1:], a.shards or a.chunks, a.chunks, str(a.dtype)) != (
                want["shape"][1:], grid, want["chunks"], want["dtype"]) or a.shape[0] < want["shape"][0]:
            out.append(f"{name} is {str(a.dtype)} {a.shape} in objects of {a.shards or a.chunks}, "
                       f"its settings make it {want['dtype']} {want['shape']} in objects of {grid}")
    return out


def build_teacher(path: Path, spec: CacheSpec, identity: dict[str, Any]) -> None:
    """A teacher's empty group (its identity as attributes) at the folder ``path``; its targets'
    fill value NaN is no log-probability, index or lse a teacher writes."""
    s = spec
    g = zarr.open_group(str(path), mode="w", zarr_format=3, attributes=identity)
    width = 2 * s.topk + 1
    g.create_array("targets", shape=(s.epochs, s.num_rows, width), shards=(s.epochs_per_unit, s.row_stride, width),
                   chunks=(1, s.row_stride, width), dtype="float32", fill_value=float("nan"),
                   filters=_FIELD_MAJOR, compressors=_TARGETS)


def pack_targets(logprobs: np.ndarray, indices: np.ndarray, lse: np.ndarray) -> np.ndarray:
    """A teacher's top-k log-probabilities and indices [..., k] and lse [...] as the stored
    float32 rows [..., 2k+1]: log-probabilities clamped to float16 (<= 0, >= its lowest)."""
    lp = np.clip(logprobs, FP16_LOWEST, 0.0).astype(np.float16).astype(np.float32)
    return np.concatenate([lp, indices.astype(np.float32), lse.astype(np.float32)[..., None]], axis=-1)


def unpack_targets(targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stored float32 rows [..., 2k+1] -> (log-probabilities [..., k] float32, indices [..., k]
    int64, lse [...] float32)."""
    k = (targets.shape[-1] - 1) // 2
    return targets[..., :k], targets[..., k:2 * k].astype(np.int64), targets[..., 2 * k]


def publish(objects: CacheRoot, prefix: str, build: Callable[[Path], None], replace: bool = False) -> None:
    """Make a zarr group at ``prefix`` of ``objects``: built by ``build(path)`` in a temp folder,
    its array metadata written, then its ``zarr.json`` created conditionally (last, so a group
    is there only whole); when another process created it first, its group is kept. With
    ``replace``, a group already there is overwritten (``cache.create``: one nothing pins)."""
    with tempfile.TemporaryDirectory(prefix="civt-cache-new-") as tmp:
        build(Path(tmp))
        files = sorted(p for p in Path(tmp).rglob("*") if p.is_file())
        top = Path(tmp) / "zarr.json"
        for f in files:
            if f != top:
                objects.write(f"{prefix}{f.relative_to(tmp).as_posix()}", f.read_bytes())
        if replace:
            objects.write(f"{prefix}zarr.json", top.read_bytes())
        else:
            objects.create(f"{prefix}zarr.json", top.read_bytes())


def metadata_problems(objects: CacheRoot, teachers: Sequence[str]) -> dict[str, str]:
    """The cache's array and group metadata objects (under its root group) that are missing or
    do not parse, by key: zarr reads them with no file named, and nothing computes around them."""
    keys = ["views/zarr.json", "teachers/zarr.json", *(f"{a}/zarr.json" for a in VIEW_ARRAYS),
            *(f"teachers/{t}/{a}/zarr.json" for t in teachers for a in TEACHER_ARRAYS)]
    out = {}
    for key in keys:
        data = objects.read(key)
        if data is None:
            out[key] = "missing"
            continue
        try:
            json.loads(data)
        except ValueError as e:
            out[key] = f"unreadable ({e})"
    return out


def rewrite_metadata(objects: CacheRoot, spec: CacheSpec, keys: Sequence[str],
                     identities: dict[str, dict[str, Any]]) -> None:
    """Write the metadata objects ``keys`` again as a cache for ``spec`` (with its teachers'
    ``identities``) has them: they follow from the settings, unlike the chunks they describe."""
    with tempfile.TemporaryDirectory(prefix="civt-cache-meta-") as tmp:
        build_cache(Path(tmp), spec)
        for name, identity in identities.items():
            build_teacher(Path(tmp) / "teachers" / name, spec, identity)
        for key in keys:
            objects.write(key, (Path(tmp) / key).read_bytes())
