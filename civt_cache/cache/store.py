"""The teacher cache: one zarr v3 group per (data manifest, view recipe, seed). This module
alone knows its layout.

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
    CACHE/progress/sSSSSSS-bBBBB.json  commit record of one unit (shard, epoch block)
    CACHE/leases/sSSSSSS-bBBBB.gGGGG.json  who computes a unit now (``--claim``; ``cache.leases``)

Every chunk covers exactly one unit (epochs_per_unit epochs x one shard's rows), so no two
processes ever write the same stored object. A unit is committed by writing its chunks and then
its commit record (temp file + rename) holding checksums; a unit without a record is redone.
New caches and new teachers are created beside the cache and renamed into place, so several
processes may race to create them without a coordinator.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec, TransposeCodec

from civt_cache.cache.spec import FP16_LOWEST, SCHEMA_VERSION, VIEWS_VERSION, CacheSpec, key_hash
from civt_cache.errors import CacheMismatchError, CorruptUnitError
from civt_cache.fsutil import atomic_write_json, create_beside, file_lock
from civt_cache.views.records import NUM_FIELDS

# Every chunk ends in a CRC32C of its compressed bytes (zarr's own v3 codec), so a flipped bit on
# disk fails the read instead of decoding into wrong numbers.
_VALUES = [BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.shuffle), Crc32cCodec()]
_BITS = [BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.bitshuffle), Crc32cCodec()]
_RAW = [Crc32cCodec()]
VIEW_ARRAYS = ("views/params", "views/keys", "views/labels")
TEACHER_ARRAYS = ("logprobs", "indices", "lse")


def committed_components(record: dict[str, Any]) -> list[str]:
    """What a commit record commits: ``views`` (when present) and each teacher's name."""
    return (["views"] if record.get("views") else []) + list(record["teachers"])


def _checksum(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:32]


class CacheStore:
    """Read/write access to one cache directory."""

    def __init__(self, root: Path, group: zarr.Group, spec: CacheSpec) -> None:
        self.root, self.group, self.spec = root, group, spec
        self.unreadable: dict[tuple[int, int], str] = {}

    # ---- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | Path, mode: str = "r") -> "CacheStore":
        """Open an existing cache; errors say what is wrong with the directory."""
        root = Path(root)
        if not (root / "zarr.json").exists():
            raise CacheMismatchError(f"{root}: not a civt-cache (no zarr.json); run cache-teachers first")
        group = zarr.open_group(str(root), mode=mode, zarr_format=3)
        attrs = dict(group.attrs)
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
        return cls(root, group, CacheSpec.from_attrs(attrs))

    @classmethod
    def create_or_open(cls, root: str | Path, spec: CacheSpec) -> "CacheStore":
        """Open the cache at ``root`` if it matches ``spec`` (else refuse, saying what differs),
        grow it when ``spec`` asks for more epochs of it, or create it atomically."""
        root = Path(root)
        if not root.exists():
            root.parent.mkdir(parents=True, exist_ok=True)
            create_beside(root, lambda tmp: cls._build(tmp, spec))
        store = cls.open(root, mode="r+")
        if store.spec.grows_to(spec):
            store = store.grow(spec.epochs)
            spec = replace(spec, epochs_per_unit=store.spec.epochs_per_unit)
        store.check_spec(spec)
        return store

    def grow(self, epochs: int) -> "CacheStore":
        """Extend the cache to ``epochs`` in place: every array gets the new epochs (new chunks,
        the committed ones untouched), the units of a short last block are un-committed (they
        get the block's new epochs, recomputed), and the epoch count in the attributes is
        written last, so a crash midway leaves the old cache readable and a rerun finishes it.
        Processes that grow the same cache at once take turns (a lock in ``progress/``)."""
        with file_lock(self.root / "progress" / ".grow.lock"):
            current = CacheStore.open(self.root, mode="r+")  # another process may have grown it
            old = current.spec
            if old.epochs >= epochs:
                return current
            if old.epochs % old.epochs_per_unit:
                for shard in range(old.num_shards):
                    current._progress_path(shard, old.num_blocks - 1).unlink(missing_ok=True)
            new = replace(old, epochs=epochs)
            g = current.group
            g["views/params"].resize((epochs, old.num_rows, NUM_FIELDS))
            for name in ("views/keys", "views/labels"):
                g[name].resize((new.num_blocks, old.num_rows))
            for teacher in current.teachers():
                for name in TEACHER_ARRAYS:
                    array = g[f"teachers/{teacher}/{name}"]
                    array.resize((epochs, *array.shape[1:]))
            g.update_attributes({"epochs": epochs})
        return CacheStore.open(self.root, mode="r+")

    def check_spec(self, spec: CacheSpec) -> None:
        diffs = self.spec.differences(spec)
        if diffs:
            raise CacheMismatchError(f"{self.root}: cache does not match the request:\n  - "
                                     + "\n  - ".join(diffs)
                                     + "\nUse another --out, or rebuild with the cache's settings.")

    @staticmethod
    def _build(path: Path, spec: CacheSpec) -> None:
        g = zarr.open_group(str(path), mode="w", zarr_format=3, attributes=spec.attrs())
        e, r, b = spec.epochs, spec.num_rows, spec.epochs_per_unit
        # fill values say "never written": a crop box of width -1, index -1, lse NaN
        g.create_array("views/params", shape=(e, r, NUM_FIELDS), chunks=(b, spec.row_stride, NUM_FIELDS),
                       dtype="int32", fill_value=-1, filters=[TransposeCodec(order=(0, 2, 1))],
                       compressors=_BITS)
        g.create_array("views/keys", shape=(spec.num_blocks, r), chunks=(1, spec.row_stride),
                       dtype="uint64", fill_value=0, compressors=_RAW)
        g.create_array("views/labels", shape=(spec.num_blocks, r), chunks=(1, spec.row_stride),
                       dtype="int32", fill_value=-1, compressors=_BITS)
        g.require_group("teachers")
        (path / "progress").mkdir()

    # ---- teachers -----------------------------------------------------------------------------
    def teachers(self) -> dict[str, dict[str, Any]]:
        """Identity of every teacher in the cache, by name."""
        tg = zarr.open_group(str(self.root / "teachers"), mode="r", zarr_format=3)
        return {name: dict(sub.attrs) for name, sub in sorted(tg.groups())}

    def ensure_teacher(self, identity: dict[str, Any]) -> None:
        """Add a teacher's (empty) arrays, or check that the stored one is the same teacher."""
        name = identity["name"]
        final = self.root / "teachers" / name
        if not final.exists():
            create_beside(final, lambda tmp: self._build_teacher(tmp, identity))
        stored = self.teachers()[name]
        for key in ("arch", "checkpoint_sha256", "num_classes"):
            if stored.get(key) != identity.get(key):
                raise CacheMismatchError(
                    f"{self.root}: teacher {name!r} in the cache has {key} {stored.get(key)!r}, "
                    f"asked {identity.get(key)!r}; give the new teacher another name")

    def _build_teacher(self, path: Path, identity: dict[str, Any]) -> None:
        s = self.spec
        if identity["num_classes"] != s.num_classes:
            raise CacheMismatchError(f"teacher {identity['name']!r} predicts {identity['num_classes']} "
                                     f"classes, the data has {s.num_classes}")
        g = zarr.open_group(str(path), mode="w", zarr_format=3, attributes=identity)
        chunks = (s.epochs_per_unit, s.row_stride, s.topk)
        g.create_array("logprobs", shape=(s.epochs, s.num_rows, s.topk), chunks=chunks,
                       dtype="float16", fill_value=float("nan"), compressors=_VALUES)
        g.create_array("indices", shape=(s.epochs, s.num_rows, s.topk), chunks=chunks,
                       dtype=s.index_dtype, fill_value=-1, compressors=_BITS)
        g.create_array("lse", shape=(s.epochs, s.num_rows), chunks=chunks[:2],
                       dtype="float32", fill_value=float("nan"), compressors=_VALUES)

    # ---- units --------------------------------------------------------------------------------
    def units(self) -> list[tuple[int, int]]:
        """All (shard, block) units in their canonical order."""
        return [(s, b) for b in range(self.spec.num_blocks) for s in range(self.spec.num_shards)]

    def block_epochs(self, block: int) -> range:
        return self.spec.block_epochs(block)

    def _progress_path(self, shard: int, block: int) -> Path:
        return self.root / "progress" / f"s{shard:06d}-b{block:04d}.json"

    def unit_record(self, shard: int, block: int) -> dict[str, Any] | None:
        """The commit record of a unit, or None if it is not (fully) committed. A record that
        cannot be read (torn by a crash outside this tool, edited, a disk error) also counts as
        not committed; ``self.unreadable`` keeps why, for the caller to say."""
        path = self._progress_path(shard, block)
        try:
            rec = json.loads(path.read_text())
            if not isinstance(rec, dict) or not isinstance(rec.get("teachers"), dict):
                raise ValueError("not a commit record")
            return rec
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
            self.unreadable[(shard, block)] = (f"{path}: unreadable commit record ({e}); the unit "
                                               "counts as not committed")
            return None

    def uncommit(self, shard: int, block: int, components: list[str]) -> None:
        """Take damaged components of a committed unit out of its record, so the next
        ``cache-teachers`` recomputes exactly those: a teacher alone, or (when the views are
        damaged, which every teacher's targets rest on) the whole unit."""
        rec = self.unit_record(shard, block)
        if "views" in components or rec is None:
            self._progress_path(shard, block).unlink(missing_ok=True)
            return
        teachers = {k: v for k, v in rec["teachers"].items() if k not in components}
        self.commit_unit(shard, block, rec["num_samples"], rec["views"], teachers)

    def commit_unit(self, shard: int, block: int, num_samples: int, views: dict[str, str],
                    teachers: dict[str, dict[str, str]]) -> None:
        """Atomically record that the unit's chunks for these components are written."""
        atomic_write_json(self._progress_path(shard, block), {
            "shard": shard, "block": block, "epochs": list(self.block_epochs(block)),
            "num_samples": num_samples, "views": views, "teachers": teachers})

    # ---- chunk I/O ----------------------------------------------------------------------------
    def _rows(self, shard: int) -> slice:
        base = shard * self.spec.row_stride
        return slice(base, base + self.spec.row_stride)

    def _pad(self, a: np.ndarray, axis: int = 1) -> np.ndarray:
        """Pad a unit's rows to the full chunk so every write covers whole chunks."""
        pad = self.spec.row_stride - a.shape[axis]
        if pad == 0:
            return a
        widths = [(0, 0)] * a.ndim
        widths[axis] = (0, pad)
        return np.pad(a, widths)

    def write_views(self, shard: int, block: int, keys: list[str], labels: np.ndarray,
                    records: np.ndarray) -> str:
        """Write a unit's records [B, n, F], key hashes and labels; returns their checksum."""
        ep, rows = self.block_epochs(block), self._rows(shard)
        hashes = np.array([key_hash(k) for k in keys], dtype=np.uint64)
        labels = np.asarray(labels, dtype=np.int32)
        self.group["views/params"][ep.start:ep.stop, rows] = self._pad(records)
        self.group["views/keys"][block:block + 1, rows] = self._pad(hashes[None])
        self.group["views/labels"][block:block + 1, rows] = self._pad(labels[None])
        return _checksum(records, hashes, labels)

    def write_teacher(self, name: str, shard: int, block: int, logprobs: np.ndarray,
                      indices: np.ndarray, lse: np.ndarray) -> str:
        """Write a unit's top-k log-probabilities / indices [B, n, k] and lse [B, n]; returns a
        checksum."""
        ep, rows = self.block_epochs(block), self._rows(shard)
        g = self.group[f"teachers/{name}"]
        stored = np.clip(logprobs, FP16_LOWEST, 0.0).astype(np.float16)
        g["logprobs"][ep.start:ep.stop, rows] = self._pad(stored)
        g["indices"][ep.start:ep.stop, rows] = self._pad(indices.astype(self.spec.index_dtype))
        g["lse"][ep.start:ep.stop, rows] = self._pad(lse.astype(np.float32))
        return _checksum(stored, indices.astype(self.spec.index_dtype), lse.astype(np.float32))

    # ---- checked reads ------------------------------------------------------------------------
    # Every read of a committed unit goes through these: each chunk file must exist (zarr would
    # hand back fill values for a missing one), decode (CRC32C), and the unit's arrays must hash
    # to the checksum its commit record holds. Any failure names the unit, array and file.

    def _arrays(self, component: str) -> list[str]:
        if component == "views":
            return list(VIEW_ARRAYS)
        return [f"teachers/{component}/{a}" for a in TEACHER_ARRAYS]

    def chunk_path(self, array: str, shard: int, block: int) -> Path:
        """The file of a unit's chunk of ``array`` (zarr's own chunk-key encoding)."""
        arr = self.group[array]
        coords = (block, shard) + (0,) * (arr.ndim - 2)
        return self.root / array / arr.metadata.encode_chunk_key(coords)

    def missing_chunks(self, shard: int, block: int, components: list[str]) -> dict[str, str]:
        """Components of a committed unit with a chunk file missing -> which (a stat each)."""
        out = {}
        for c in components:
            gone = [p for a in self._arrays(c) if not (p := self.chunk_path(a, shard, block)).is_file()]
            if gone:
                out[c] = f"chunk file {gone[0]} is missing"
        return out

    def _unit_error(self, shard: int, block: int, array: str, problem: str) -> CorruptUnitError:
        epochs = self.block_epochs(block)
        return CorruptUnitError(
            f"{self.root}: unit (shard {shard}, epochs {epochs.start}-{epochs.stop - 1}), array "
            f"{array}, file {self.chunk_path(array, shard, block)}: {problem}",
            f"Run `civt-cache verify {self.root} --full` to list every damaged unit, then "
            "`civt-cache cache-teachers ... --repair` to recompute them")

    def _read_chunk(self, array: str, shard: int, block: int, sel: tuple) -> np.ndarray:
        path = self.chunk_path(array, shard, block)
        if not path.is_file():
            raise self._unit_error(shard, block, array, "chunk file is missing")
        try:
            return self.group[array][sel]
        except (ValueError, RuntimeError, OSError) as e:  # CRC mismatch, Blosc/zstd failure
            raise self._unit_error(shard, block, array, f"chunk does not decode ({e})") from None

    def _check_sum(self, shard: int, block: int, component: str, expected: str | None,
                   arrays: tuple[np.ndarray, ...]) -> None:
        if expected is None:
            raise CacheMismatchError(f"{self.root}: unit (shard {shard}, block {block}) has no "
                                     f"committed {component}; run cache-teachers to finish it")
        if _checksum(*arrays) != expected:
            name = "views/params" if component == "views" else f"teachers/{component}/logprobs"
            raise self._unit_error(shard, block, name, f"{component} arrays do not match the "
                                   "checksum of the unit's commit record")

    def read_unit_views(self, shard: int, block: int, record: dict[str, Any]) -> tuple[
            np.ndarray, np.ndarray, np.ndarray]:
        """Checked (records [B, n, F], key hashes [n], labels [n]) of a committed unit."""
        ep, rows, n = self.block_epochs(block), self._rows(shard), record["num_samples"]
        recs = self._read_chunk("views/params", shard, block, (slice(ep.start, ep.stop), rows))[:, :n]
        keys = self._read_chunk("views/keys", shard, block, (block, rows))[:n]
        labels = self._read_chunk("views/labels", shard, block, (block, rows))[:n]
        self._check_sum(shard, block, "views", (record.get("views") or {}).get("sha256"),
                        (recs, keys, labels))
        return recs, keys, labels

    def read_unit_teacher(self, name: str, shard: int, block: int, record: dict[str, Any]) -> tuple[
            np.ndarray, np.ndarray, np.ndarray]:
        """Checked (logprobs [B, n, k] float16, indices [B, n, k], lse [B, n] float32) of a unit."""
        ep, rows, n = self.block_epochs(block), self._rows(shard), record["num_samples"]
        sel = (slice(ep.start, ep.stop), rows)
        out = tuple(self._read_chunk(f"teachers/{name}/{a}", shard, block, sel)[:, :n]
                    for a in TEACHER_ARRAYS)
        self._check_sum(shard, block, name, record["teachers"].get(name, {}).get("sha256"), out)
        return out  # type: ignore[return-value]

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
            np.ndarray, np.ndarray, np.ndarray, dict[str, tuple[np.ndarray, ...]]]:
        """One (shard, epoch) of a committed unit, checked: records [n, F], key hashes [n],
        labels [n], and per teacher (logprobs [n, k] float32, indices [n, k] int64, lse [n]).
        The unit's chunks are decoded whole either way (one chunk = one unit), so checking the
        whole unit costs no extra read."""
        block = epoch // self.spec.epochs_per_unit
        j = epoch - self.block_epochs(block).start
        recs, keys, labels = self.read_unit_views(shard, block, record)
        out = {}
        for name in teachers:
            logprobs, indices, lse = self.read_unit_teacher(name, shard, block, record)
            out[name] = (logprobs[j].astype(np.float32), indices[j].astype(np.int64),
                         lse[j].astype(np.float32))
        return recs[j], keys, labels, out

    def disk_bytes(self, chunks_only: bool = False) -> dict[str, int]:
        """Bytes on disk per top-level component (views, each teacher, progress); with
        ``chunks_only`` just the arrays' chunk files (zarr v3 keeps them under ``c/``), which is
        what grows with the data, without the fixed metadata and commit records."""
        out: dict[str, int] = {}
        subs = ["views", "progress"] + [f"teachers/{t}" for t in self.teachers()]
        for sub in subs[:1] + subs[2:] if chunks_only else subs:
            base = self.root / sub
            out[sub] = sum(f.stat().st_size for f in base.rglob("*") if f.is_file()
                           and (not chunks_only or "c" in f.relative_to(base).parts))
        return out
