"""Read/write access to a teacher cache, in a folder or under an object-storage prefix
(``cache.objects``): opening, creating and growing it, writing a unit's arrays, committing it
(``cache.commits``), and checked reads, each naming the unit and object that fails. The layout
(arrays, shapes, shards, codecs) is ``cache.layout``'s.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import zarr

from civt_cache.cache.commits import Commits, committed_components
from civt_cache.cache.layout import (
    PARAMS,
    SAMPLES,
    TEACHER_ARRAYS,
    VIEW_ARRAYS,
    build_teacher,
    pack_targets,
    publish,
    unpack_targets,
)
from civt_cache.cache.objects import CacheRoot
from civt_cache.cache.spec import SCHEMA_VERSION, VIEWS_VERSION, CacheSpec, check_alignment, key_hash
from civt_cache.data.manifest import DataManifest
from civt_cache.data.shards import Sample
from civt_cache.errors import CacheMismatchError, CorruptUnitError
from civt_cache.views.records import NUM_FIELDS


def _checksum(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:32]


def _sums(epochs: list[tuple[np.ndarray, ...]], samples: np.ndarray | None = None) -> dict[str, Any]:
    """A component's checksums: ``sha256`` of the whole unit (every epoch's arrays stacked, then
    the unit's ``samples``), ``epochs``, one per epoch (its arrays alone), and ``samples``, the
    samples' own: a reader of one epoch checks what it reads and no more, and checks that its
    shard is the cached one without reading the stored samples (``CacheStore.check_samples``)."""
    stacked = tuple(np.stack([e[i] for e in epochs]) for i in range(len(epochs[0])))
    shared = () if samples is None else (samples,)
    out: dict[str, Any] = {"sha256": _checksum(*stacked, *shared), "epochs": [_checksum(*e) for e in epochs]}
    if samples is not None:
        out["samples"] = _checksum(samples)
    return out


def sample_ids(keys: Sequence[str], labels: Sequence[int] | np.ndarray) -> np.ndarray:
    """What ``views/samples`` stores of a unit's samples: [n, 2] uint64 (key hash, label)."""
    return np.stack([np.array([key_hash(k) for k in keys], dtype=np.uint64),
                     np.asarray(labels, dtype=np.uint64)], axis=1)


def identity_differences(stored: dict[str, Any], asked: dict[str, Any]) -> list[str]:
    """How a cached teacher's identity differs from an asked one's, key by key: what makes it
    another teacher (its architecture, weights or classes; not where its file now is)."""
    return [f"{key}: cache has {stored.get(key)!r}, asked {asked.get(key)!r}"
            for key in ("arch", "checkpoint_sha256", "num_classes") if stored.get(key) != asked.get(key)]


class CacheStore:
    """Read/write access to one cache."""

    def __init__(self, objects: CacheRoot, group: zarr.Group, spec: CacheSpec) -> None:
        self.objects, self.group, self.spec = objects, group, spec
        self.root = objects.location  # a Path, or an s3:// / gs:// URL: what messages name
        self.commits = Commits(objects, spec)
        self._arrays_open: dict[str, zarr.Array] = {}

    @property
    def unreadable(self) -> dict[tuple[int, int], str]:
        return self.commits.unreadable

    # ---- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | Path, mode: str = "r") -> "CacheStore":
        """Open an existing cache; errors say what is wrong with it."""
        objects = CacheRoot(root)
        meta = objects.read("zarr.json")
        if meta is None:
            raise CacheMismatchError(f"{root}: not a civt-cache (no zarr.json); run cache-teachers first")
        try:
            attrs = json.loads(meta).get("attributes", {})
        except ValueError:
            raise CacheMismatchError(f"{objects.name('zarr.json')}: unreadable group metadata") from None
        if attrs.get("kind") != "civt-cache":
            raise CacheMismatchError(f"{root}: zarr group is not a civt-cache")
        if attrs.get("schema_version") != SCHEMA_VERSION:
            raise CacheMismatchError(f"{root}: cache schema {attrs.get('schema_version')}, "
                                     f"this civt-cache reads schema {SCHEMA_VERSION}")
        if attrs.get("views_version", 1) != VIEWS_VERSION:
            raise CacheMismatchError(
                f"{root}: its view records were made for views version {attrs.get('views_version', 1)}; "
                f"this civt-cache samples and renders records as version {VIEWS_VERSION}, so the "
                "cached views cannot be replayed. Build a new cache (cache-teachers --out NEW)")
        group = zarr.open_group(objects.zarr_store(read_only=mode == "r"), mode=mode, zarr_format=3)
        return cls(objects, group, CacheSpec.from_attrs(attrs))

    def grow(self, epochs: int) -> "CacheStore":
        """Extend the cache to ``epochs`` in place: every array gets the new epochs (new objects,
        the committed ones untouched), and the epoch count in the attributes is written last, so
        a crash midway leaves the old cache readable and a rerun finishes it. The units of a
        short last block get the block's new epochs: their records name the old epochs, so they
        count as not committed and are recomputed (``cache.commits``). Any number of processes
        may grow a cache to the same epochs at once: every write is the same."""
        old = self.spec
        g = self.group
        g[PARAMS].resize((epochs, old.num_rows, NUM_FIELDS))
        g[SAMPLES].resize((replace(old, epochs=epochs).num_blocks, old.num_rows, 2))
        for teacher in self.teachers():
            for name in TEACHER_ARRAYS:
                array = g[f"teachers/{teacher}/{name}"]
                array.resize((epochs, *array.shape[1:]))
        g.update_attributes({"epochs": epochs})
        return CacheStore.open(self.root, mode="r+")

    def check_still_made_for_me(self) -> None:
        """Refuse to commit into a cache made again meanwhile with other settings (``cache.create``
        remakes a cache no unit pins): one read of its metadata, before a process's first commit.
        More epochs are no other settings: another process may grow the cache meanwhile."""
        now = CacheStore.open(self.root).spec
        diffs = (now.differences(replace(self.spec, epochs=now.epochs)) if now.epochs >= self.spec.epochs
                 else [f"epochs: cache has {now.epochs}, this run {self.spec.epochs}"])
        if diffs:
            raise CacheMismatchError(f"{self.root}: was made again by another run with other settings while this "
                                     f"one computed its first unit ({'; '.join(diffs)}); nothing of this run "
                                     "was committed")

    def check_spec(self, spec: CacheSpec) -> None:
        diffs = self.spec.differences(spec)
        if diffs:
            raise CacheMismatchError(f"{self.root}: cache does not match the request:\n  - "
                                     + "\n  - ".join(diffs)
                                     + "\nUse another --out, or rebuild with the cache's settings.")

    # ---- teachers -----------------------------------------------------------------------------
    def teachers(self) -> dict[str, dict[str, Any]]:
        """Identity of every teacher in the cache, by name (as stored now: another process may
        have added one since this cache was opened)."""
        tg = zarr.open_group(self.objects.zarr_store(read_only=True), path="teachers", mode="r", zarr_format=3)
        return {name: dict(sub.attrs) for name, sub in sorted(tg.groups())}

    def ensure_teacher(self, identity: dict[str, Any]) -> None:
        """Add a teacher's (empty) arrays, or check that the stored one is the same teacher."""
        name = identity["name"]
        if not self.objects.exists(f"teachers/{name}/zarr.json"):
            if identity["num_classes"] != self.spec.num_classes:
                raise CacheMismatchError(f"teacher {name!r} predicts {identity['num_classes']} "
                                         f"classes, the data has {self.spec.num_classes}")
            publish(self.objects, f"teachers/{name}/", lambda tmp: build_teacher(tmp, self.spec, identity))
        diffs = identity_differences(self.teachers()[name], identity)
        if diffs:
            raise CacheMismatchError(f"{self.root}: teacher {name!r} in the cache differs ({'; '.join(diffs)}); "
                                     "give the new teacher another name")

    def _array(self, name: str) -> zarr.Array:
        """An array of the cache, its metadata read once per store."""
        if name not in self._arrays_open:
            try:
                self._arrays_open[name] = self.group[name]
            except (ValueError, KeyError) as e:  # zarr names no file: this does
                raise CorruptUnitError(f"{self.objects.name(name + '/zarr.json')}: array metadata unreadable or "
                                       f"missing ({type(e).__name__}: {str(e)[:120]}); `cache-teachers --repair` "
                                       "writes it again from the cache's settings") from None
        return self._arrays_open[name]

    # ---- units --------------------------------------------------------------------------------
    def units(self) -> list[tuple[int, int]]:
        """All (shard, block) units in their canonical order."""
        return [(s, b) for b in range(self.spec.num_blocks) for s in range(self.spec.num_shards)]

    def block_epochs(self, block: int) -> range:
        return self.spec.block_epochs(block)

    def unit_record(self, shard: int, block: int) -> dict[str, Any] | None:
        """The commit record of a unit, or None if it is not (fully) committed. A record that
        cannot be read (torn by a crash outside this tool, edited, a disk error) also counts as
        not committed; ``self.unreadable`` keeps why, for the caller to say."""
        return self.commits.read(shard, block)

    def uncommit(self, shard: int, block: int, components: list[str]) -> None:
        """Take damaged components of a committed unit out of its record, so the next
        ``cache-teachers`` recomputes exactly those: a teacher alone, or (when the views are
        damaged, which every teacher's targets rest on) the whole unit."""
        rec = self.unit_record(shard, block)
        if "views" in components or rec is None:
            self.commits.delete(shard, block)
            return
        teachers = {k: v for k, v in rec["teachers"].items() if k not in components}
        self.commit_unit(shard, block, rec["num_samples"], rec["views"], teachers, replaces=True)

    def commit_unit(self, shard: int, block: int, num_samples: int, views: dict[str, Any],
                    teachers: dict[str, dict[str, Any]], replaces: bool) -> dict[str, Any] | None:
        """Record that the unit's objects for these components are written (``cache.commits``).
        Returns None when committed, else the record another process committed first."""
        return self.commits.commit(shard, block, {
            "shard": shard, "block": block, "epochs": list(self.block_epochs(block)),
            "num_samples": num_samples, "views": views, "teachers": teachers}, replaces)

    # ---- chunk I/O ----------------------------------------------------------------------------
    def _rows(self, shard: int) -> slice:
        base = shard * self.spec.row_stride
        return slice(base, base + self.spec.row_stride)

    def _pad(self, a: np.ndarray, axis: int = 1) -> np.ndarray:
        """Pad a unit's rows to the full chunk so every write covers whole objects."""
        pad = self.spec.row_stride - a.shape[axis]
        if pad == 0:
            return a
        widths = [(0, 0)] * a.ndim
        widths[axis] = (0, pad)
        return np.pad(a, widths)

    def write_views(self, shard: int, block: int, keys: list[str], labels: np.ndarray,
                    records: np.ndarray) -> dict[str, Any]:
        """Write a unit's records [B, n, F], key hashes and labels; returns their checksums."""
        ep, rows = self.block_epochs(block), self._rows(shard)
        samples = sample_ids(keys, labels)
        self._write(PARAMS, shard, block, (slice(ep.start, ep.stop), rows), self._pad(records))
        self._write(SAMPLES, shard, block, (slice(block, block + 1), rows), self._pad(samples[None]))
        return _sums([(r,) for r in records], samples)

    def write_teacher(self, name: str, shard: int, block: int, logprobs: np.ndarray,
                      indices: np.ndarray, lse: np.ndarray) -> dict[str, Any]:
        """Write a unit's top-k log-probabilities / indices [B, n, k] and lse [B, n]; returns
        their checksums."""
        ep, rows = self.block_epochs(block), self._rows(shard)
        targets = pack_targets(logprobs, indices, lse)
        self._write(f"teachers/{name}/targets", shard, block, (slice(ep.start, ep.stop), rows), self._pad(targets))
        return _sums([(t,) for t in targets])

    # ---- checked reads ------------------------------------------------------------------------
    # Every read of a committed unit goes through these: each inner chunk must decode (CRC32C)
    # and the arrays read must hash to the checksum the commit record holds (zarr hands back fill
    # values for a missing object, which never match). Any failure names the unit, array, object.

    def _arrays(self, component: str) -> list[str]:
        if component == "views":
            return list(VIEW_ARRAYS)
        return [f"teachers/{component}/{a}" for a in TEACHER_ARRAYS]

    def chunk_key(self, array: str, shard: int, block: int) -> str:
        """The key of a unit's object of ``array`` (zarr's own chunk-key encoding)."""
        arr = self._array(array)
        coords = (block, shard) + (0,) * (arr.ndim - 2)
        return f"{array}/{arr.metadata.encode_chunk_key(coords)}"

    def chunk_path(self, array: str, shard: int, block: int) -> str | Path:
        """Where a unit's object of ``array`` is (a file, or an object's URL)."""
        return self.objects.name(self.chunk_key(array, shard, block))

    def lost_chunks(self, shard: int, block: int, components: list[str], present: set[str]) -> dict[str, str]:
        """Components of a committed unit with an object missing from ``present`` -> which."""
        out = {}
        for c in components:
            gone = [k for a in self._arrays(c) if (k := self.chunk_key(a, shard, block)) not in present]
            if gone:
                out[c] = f"chunk file {self.objects.name(gone[0])} is missing"
        return out

    def chunk_keys(self) -> set[str]:
        """Every array object stored: one listing per array (a request per 1,000 in a bucket)."""
        arrays = list(VIEW_ARRAYS) + [f"teachers/{t}/{a}" for t in self.teachers() for a in TEACHER_ARRAYS]
        return {k for a in arrays for k in self.objects.listing(f"{a}/c")}

    def _unit_error(self, shard: int, block: int, array: str, problem: str) -> CorruptUnitError:
        epochs = self.block_epochs(block)
        return CorruptUnitError(
            f"{self.root}: unit (shard {shard}, epochs {epochs.start}-{epochs.stop - 1}), array "
            f"{array}, file {self.chunk_path(array, shard, block)}: {problem}",
            f"Run `civt-cache verify {self.root} --full` to list every damaged unit, then "
            "`civt-cache cache-teachers ... --repair` to recompute them")

    def _read(self, array: str, shard: int, block: int, sel: tuple) -> np.ndarray:
        """Read ``sel`` of a unit's object: a storage error is retried, then named; a chunk
        that does not decode is a damaged unit."""
        def read() -> np.ndarray:
            try:
                return self._array(array)[sel]
            except (ValueError, RuntimeError) as e:  # CRC mismatch, Blosc/zstd failure
                raise self._unit_error(shard, block, array, f"chunk does not decode ({e})") from None
        return self.objects.retry("read", self.chunk_key(array, shard, block), read)

    def _write(self, array: str, shard: int, block: int, sel: tuple, values: np.ndarray) -> None:
        """Write a unit's whole object of ``array`` (idempotent, so a failed PUT is retried)."""
        self.objects.retry("write", self.chunk_key(array, shard, block),
                           lambda: self._array(array).__setitem__(sel, values))

    def _check_sum(self, shard: int, block: int, component: str, expected: str | None,
                   arrays: tuple[np.ndarray, ...], read: list[str] | None = None) -> None:
        """``arrays`` (read from the objects of ``read``, by default all of the component's)
        must hash to ``expected``, or the unit is damaged: the error names the object."""
        if expected is None:
            raise CacheMismatchError(f"{self.root}: unit (shard {shard}, block {block}) has no "
                                     f"committed {component}; run cache-teachers to finish it")
        if _checksum(*arrays) == expected:
            return
        read = read or self._arrays(component)
        for array in read:  # a missing object reads as fill values: say so
            if not self.objects.exists(self.chunk_key(array, shard, block)):
                raise self._unit_error(shard, block, array, "chunk file is missing")
        raise self._unit_error(shard, block, read[0], f"{component} arrays do not match the "
                               "checksum of the unit's commit record")

    def _records(self, shard: int, block: int, record: dict[str, Any], epochs: slice) -> np.ndarray:
        """A unit's view records of ``epochs`` [B, n, F], as stored."""
        return self._read(PARAMS, shard, block, (epochs, self._rows(shard)))[:, :record["num_samples"]]

    def _samples(self, shard: int, block: int, record: dict[str, Any]) -> np.ndarray:
        """A unit's samples [n, 2] (key hash, label), as stored."""
        return self._read(SAMPLES, shard, block, (block, self._rows(shard)))[:record["num_samples"]]

    def _targets(self, name: str, shard: int, block: int, record: dict[str, Any], epochs: slice) -> np.ndarray:
        rows, n = self._rows(shard), record["num_samples"]
        return self._read(f"teachers/{name}/targets", shard, block, (epochs, rows))[:, :n]

    def read_unit_views(self, shard: int, block: int, record: dict[str, Any]) -> tuple[
            np.ndarray, np.ndarray, np.ndarray]:
        """Checked (records [B, n, F], key hashes [n] uint64, labels [n]) of a committed unit."""
        ep = self.block_epochs(block)
        recs = self._records(shard, block, record, slice(ep.start, ep.stop))
        samples = self._samples(shard, block, record)
        self._check_sum(shard, block, "views", (record.get("views") or {}).get("sha256"), (recs, samples))
        return recs, samples[:, 0], samples[:, 1].astype(np.int64)

    def check_samples(self, shard: int, block: int, record: dict[str, Any], manifest: DataManifest,
                      samples: Sequence[Sample]) -> None:
        """Refuse a shard whose samples are not the ones a unit was cached from: their (key hash,
        label) must hash to the unit's ``samples`` checksum. Only when they do not are the stored
        ones read (checked), to name the first sample that differs."""
        expected = (record.get("views") or {}).get("samples")
        if _checksum(sample_ids([s.key for s in samples], [s.label for s in samples])) == expected:
            return
        stored = self._samples(shard, block, record)
        self._check_sum(shard, block, "views", expected, (stored,), [SAMPLES])
        if len(samples) != len(stored):
            raise CacheMismatchError(f"{manifest.shard_path(shard)}: holds {len(samples)} samples, the cache "
                                     f"{self.root} was built from {len(stored)}; the shard changed after caching")
        check_alignment(self.root, manifest, shard, samples, stored[:, 0], stored[:, 1])

    def read_unit_teacher(self, name: str, shard: int, block: int, record: dict[str, Any]) -> tuple[
            np.ndarray, np.ndarray, np.ndarray]:
        """Checked (logprobs [B, n, k], indices [B, n, k] int64, lse [B, n]) of a unit."""
        ep = self.block_epochs(block)
        targets = self._targets(name, shard, block, record, slice(ep.start, ep.stop))
        self._check_sum(shard, block, name, record["teachers"].get(name, {}).get("sha256"), (targets,))
        return unpack_targets(targets)

    def check_unit(self, shard: int, block: int, record: dict[str, Any]) -> dict[str, str]:
        """Damaged components of a committed unit -> what is wrong (empty when sound)."""
        bad = {}
        for component in committed_components(record):
            try:
                if component == "views":
                    self.read_unit_views(shard, block, record)
                else:
                    self.read_unit_teacher(component, shard, block, record)
            except CorruptUnitError as e:
                bad[component] = e.where
        return bad

    def read_epoch(self, shard: int, epoch: int, record: dict[str, Any], teachers: list[str]) -> tuple[
            np.ndarray, dict[str, tuple[np.ndarray, ...]]]:
        """One (shard, epoch) of a committed unit, checked against that epoch's checksums:
        records [n, F] and per teacher (logprobs [n, k] float32, indices [n, k] int64, lse [n]).
        Only the epoch's inner chunks are read; ``check_samples`` checks the shard against it."""
        block = epoch // self.spec.epochs_per_unit
        j = epoch - self.block_epochs(block).start
        one = slice(epoch, epoch + 1)

        def expected(sums: dict[str, Any] | None) -> str | None:
            return sums["epochs"][j] if sums else None
        recs = self._records(shard, block, record, one)[0]
        self._check_sum(shard, block, "views", expected(record.get("views")), (recs,), [PARAMS])
        out = {}
        for name in teachers:
            targets = self._targets(name, shard, block, record, one)[0]
            self._check_sum(shard, block, name, expected(record["teachers"].get(name)), (targets,))
            out[name] = unpack_targets(targets)
        return recs, out

    def disk_bytes(self, chunks_only: bool = False) -> dict[str, int]:
        """Bytes stored per top-level component (views, each teacher, progress); with
        ``chunks_only`` just the arrays' objects (zarr v3 keeps them under ``c/``), which is
        what grows with the data, without the fixed metadata and commit records."""
        out: dict[str, int] = {}
        subs = ["views", "progress"] + [f"teachers/{t}" for t in self.teachers()]
        for sub in subs[:1] + subs[2:] if chunks_only else subs:
            listed = self.objects.listing(sub)
            out[sub] = sum(size for key, (_, size) in listed.items()
                           if not chunks_only or "c" in key[len(sub) + 1:].split("/"))
        return out
