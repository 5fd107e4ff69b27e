"""``make-shards MANIFEST OUT``: a manifest's shards (e.g. written class by class elsewhere)
rewritten shuffled, in memory bounded by ``--max-memory-mb`` whatever the data's size.

ImageNet's 140 GB cannot be held in memory, so the shuffle goes through files on disk, in two
passes (Rao's two-pass shuffle):

1. every source shard is read once (its sha256 checked on the read) and each of its samples is
   appended to one of ``B`` bucket files chosen at random;
2. each bucket in turn is read back in a random permutation of its records.

A sample lands in a uniformly random bucket and every bucket is uniformly permuted, so the
output order is a uniformly random permutation of all samples. Memory holds one source shard in
pass one and, in pass two, a bucket's record offsets (8 bytes a sample) and one record at a
time; the bucket itself is read from the file system's cache, which ``B`` keeps under half of
the memory bound per bucket. The spool needs the data's size in free disk, checked up front,
and is removed whatever happens.
"""
from __future__ import annotations

import math
import shutil
import struct
import tempfile
from array import array
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from civt_cache.data.manifest import DataManifest
from civt_cache.data.shards import read_shard
from civt_cache.data.writer import SourceItem
from civt_cache.errors import ConfigError
from civt_cache.fsutil import out_of_space
from civt_cache.progress import Progress

#: At most this many bucket files open at once in pass one.
MAX_BUCKETS = 512
#: (source shard, label, key length, image length) before each record's key and image bytes.
_HEADER = struct.Struct("<IIHI")


class ShuffleSpool:
    """A manifest's samples in a seeded uniform random order, spooled through ``folder``.
    Use as a context manager: the spool is removed on exit, finished or not."""

    def __init__(self, manifest: DataManifest, seed: int, max_memory_mb: int, folder: Path) -> None:
        budget = max_memory_mb * 2**20
        largest = max(range(len(manifest.shards)), key=lambda i: manifest.shards[i].bytes)
        need = 2 * manifest.shards[largest].bytes  # its bytes and its samples, parsed
        if need > budget:
            raise ConfigError(f"make-shards: --max-memory-mb {max_memory_mb}: under the {need / 2**20:,.0f} MB "
                              f"that reading the largest shard takes ({manifest.shard_path(largest)}, "
                              f"{manifest.shards[largest].bytes / 2**20:,.0f} MB); raise it")
        self.manifest, self.seed = manifest, seed
        self.total_bytes = sum(s.bytes for s in manifest.shards)
        self.buckets = min(MAX_BUCKETS, max(1, math.ceil(2 * self.total_bytes / budget)))
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
        if free < self.total_bytes * 1.05:
            raise ConfigError(f"make-shards: the shuffle spools {self.total_bytes / 2**30:,.2f} GiB through "
                              f"{folder}, which has {free / 2**30:,.2f} GiB free; point --spool-dir at a "
                              "larger disk")
        self.folder = Path(tempfile.mkdtemp(prefix=".civt-spool-", dir=folder))

    def __enter__(self) -> ShuffleSpool:
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    @property
    def total(self) -> int:
        return self.manifest.num_samples

    def _path(self, bucket: int) -> Path:
        return self.folder / f"bucket-{bucket:04d}.bin"

    def items(self) -> Iterator[SourceItem]:
        """Pass one at the first ``next``, then pass two's items one at a time."""
        rng = np.random.default_rng(self.seed)
        offsets = self._spool(rng)
        for bucket, starts in enumerate(offsets):
            with open(self._path(bucket), "rb") as f:
                for i in rng.permutation(len(starts)):
                    yield self._record(f, starts[int(i)])
            self._path(bucket).unlink()

    def _spool(self, rng: np.random.Generator) -> list[array]:
        """Pass one: every sample appended to a random bucket file; each bucket's record offsets."""
        m = self.manifest
        offsets = [array("q") for _ in range(self.buckets)]
        ends = [0] * self.buckets
        files = [open(self._path(b), "wb") for b in range(self.buckets)]
        bar = Progress(len(m.shards), f"make-shards: shuffling {m.name} through {self.folder}", "shards")
        try:
            for shard in range(len(m.shards)):
                samples = read_shard(m, shard)
                for sample, bucket in zip(samples, rng.integers(self.buckets, size=len(samples)).tolist()):
                    key = sample.key.encode()
                    record = _HEADER.pack(shard, sample.label, len(key), len(sample.image)) + key
                    offsets[bucket].append(ends[bucket])
                    self._write(files[bucket], bucket, record, sample.image)
                    ends[bucket] += len(record) + len(sample.image)
                bar.update(1)
        finally:
            for f in files:
                f.close()
            bar.close()
        return offsets

    def _write(self, f: BinaryIO, bucket: int, record: bytes, image: bytes) -> None:
        try:
            f.write(record)
            f.write(image)
        except OSError as e:
            full = out_of_space(e, self._path(bucket))
            if full is None:
                raise
            raise ConfigError(f"make-shards: the shuffle's spool is full: {full.filename}: {full.strerror}; "
                              "nothing was written to the output (point --spool-dir at a larger disk)") from None

    def _record(self, f: BinaryIO, start: int) -> SourceItem:
        f.seek(start)
        shard, label, key_len, size = _HEADER.unpack(f.read(_HEADER.size))
        key = f.read(key_len).decode()
        return SourceItem(key, label, f"{self.manifest.shard_path(shard)}: sample {key!r}", f.read(size))
