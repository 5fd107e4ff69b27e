"""Commit records: which components (views, each teacher) of a unit are written and sound.

A unit's record ``progress/sSSSSSS-bBBBB.json`` is written after the unit's chunks and holds
their checksums: the whole unit's and one per epoch (stage two reads and checks one epoch at a
time). A unit is committed by one *conditional create* of its record (``CacheRoot.create``: a
hard link on a disk, ``If-None-Match: *`` on S3), so no rename is needed and two processes that
computed the same unit (a lease that ran out while its holder stalled) cannot both commit it
unawares: the second learns that the first did. Adding a teacher to a committed unit, or taking
a damaged component out (``--repair``), replaces the record whole; both happen under the unit's
lease or in its only process. A record whose epochs are not the unit's epochs any more (the
cache grew and its short last block got more) counts as not committed.

Start-up reads every record once: one listing of ``progress/`` (one request per 1,000 units in a
bucket) and ``progress/index.json.gz``, a copy of the records keyed by each record's stamp, so
only records written since the index was saved are read one by one: O(1) requests per rank at
start instead of one per unit.
"""
from __future__ import annotations

import gzip
import json
import re
from typing import Any

from civt_cache.cache.objects import CacheRoot
from civt_cache.cache.spec import CacheSpec
from civt_cache.fsutil import json_bytes

_RECORD = re.compile(r"^progress/s(\d{6})-b(\d{4})\.json$")
INDEX_KEY = "progress/index.json.gz"


def record_key(shard: int, block: int) -> str:
    return f"progress/s{shard:06d}-b{block:04d}.json"


def committed_components(record: dict[str, Any]) -> list[str]:
    """What a commit record commits: ``views`` (when present) and each teacher's name."""
    return (["views"] if record.get("views") else []) + list(record["teachers"])


def any_committed(objects: CacheRoot) -> bool:
    """Whether any unit of the cache has a commit record (one listing of ``progress/``)."""
    return any(_RECORD.match(key) for key in objects.listing("progress"))


class Commits:
    """The commit records of one cache."""

    def __init__(self, objects: CacheRoot, spec: CacheSpec) -> None:
        self.objects, self.spec = objects, spec
        self.unreadable: dict[tuple[int, int], str] = {}
        # records this process read, by key: (stamp, record); ``all`` reads one again only when
        # its stamp changed, so a process that asks every few seconds (--claim's rounds) reads
        # each record once, not once a round
        self._read: dict[str, tuple[str, dict[str, Any]]] = {}
        self._index: tuple[str | None, dict[str, tuple[str, dict[str, Any]]]] = (None, {})  # (its stamp, it)

    def _parse(self, shard: int, block: int, data: bytes | None) -> dict[str, Any] | None:
        """The record in ``data``; None when absent, unreadable (noted in ``unreadable``) or
        made for other epochs than the unit's now."""
        if data is None:
            return None
        try:
            rec = json.loads(data)
            if not isinstance(rec, dict) or not isinstance(rec.get("teachers"), dict):
                raise ValueError("not a commit record")
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
            self.unreadable[(shard, block)] = (f"{self.objects.name(record_key(shard, block))}: unreadable "
                                               f"commit record ({e}); the unit counts as not committed")
            return None
        return self._current(block, rec)

    def _current(self, block: int, rec: dict[str, Any]) -> dict[str, Any] | None:
        """``rec``, unless it was made for other epochs than the block's now (before the cache grew)."""
        return rec if rec.get("epochs") == list(self.spec.block_epochs(block)) else None

    def read(self, shard: int, block: int) -> dict[str, Any] | None:
        """The unit's record (one read), or None if the unit is not (fully) committed."""
        return self._parse(shard, block, self.objects.read(record_key(shard, block)))

    def all(self, save_index: bool = False) -> dict[tuple[int, int], dict[str, Any]]:
        """Every unit's record, from one listing and the index (records written since the index
        are read one by one); with ``save_index`` a new index is saved when any was."""
        listed = self.objects.listing("progress")
        index = self._index_at(listed[INDEX_KEY][0] if INDEX_KEY in listed else None)
        out, fresh = {}, {}
        for key, (stamp, _) in listed.items():
            m = _RECORD.match(key)
            if not m:
                continue
            unit = (int(m.group(1)), int(m.group(2)))
            entry = self._read.get(key) or index.get(key)
            if entry is not None and entry[0] == stamp:
                rec = self._current(unit[1], entry[1])
                if key not in index:
                    fresh[key] = entry
            else:
                raw = self.objects.read(key)
                rec = self._parse(*unit, raw)
                if rec is not None and raw is not None:
                    fresh[key] = self._read[key] = (stamp, rec)
            if rec is not None:
                out[unit] = rec
        if save_index and fresh:
            kept = {k: v for k, v in index.items() if k in listed and listed[k][0] == v[0]}
            body = json.dumps({k: list(v) for k, v in {**kept, **fresh}.items()}, separators=(",", ":"))
            self.objects.write(INDEX_KEY, gzip.compress(body.encode(), mtime=0))
        return out

    def _index_at(self, stamp: str | None) -> dict[str, tuple[str, dict[str, Any]]]:
        """The saved index as listed with ``stamp`` (None: there is none), read again only when
        it changed since this process last read it."""
        if stamp is None:
            return {}
        if self._index[0] != stamp:
            self._index = (stamp, self._load_index())
        return self._index[1]

    def _load_index(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """The saved index (empty when missing or unreadable: then every record is read)."""
        data = self.objects.read(INDEX_KEY)
        try:
            return {k: (v[0], v[1]) for k, v in json.loads(gzip.decompress(data)).items()} if data else {}
        except (OSError, ValueError, TypeError, IndexError, AttributeError, EOFError):
            return {}

    def commit(self, shard: int, block: int, record: dict[str, Any], replaces: bool) -> dict[str, Any] | None:
        """Commit the unit. ``replaces``: the caller holds a record of it and replaces it (more
        teachers, or fewer after a repair). Otherwise a conditional create: None when it made
        the record, else the record another process committed first."""
        key, body = record_key(shard, block), json_bytes(record)
        if replaces:
            self.objects.write(key, body)
            return None
        if self.objects.create(key, body):
            return None
        existing = self.read(shard, block)
        if existing is None:  # a record from before the cache grew, or unreadable: ours replaces it
            self.objects.write(key, body)
        return existing

    def delete(self, shard: int, block: int) -> None:
        self.objects.delete(record_key(shard, block))
