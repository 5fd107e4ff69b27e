"""Making the cache a stage-one run writes into: created, opened when it matches the run's
settings, grown when the run asks for more epochs of it, or made again with the run's settings
while nothing in it is committed.

Why the last: a run refused after its cache was made (a shard that fails its checksum in the
first unit, a teacher that will not load on one rank) leaves a cache with no unit in it, and
such a cache holds no work worth keeping. Pinning its settings would refuse the corrected rerun
("cache does not match the request") until the user deletes the folder by hand. A cache with
a committed unit, or a lease (a process computing a unit now), keeps its settings; a process
that computes without leases checks, before its first commit, that the cache still has its
settings (``CacheStore.check_still_made_for_me``), so a run made again under it stops there.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

from civt_cache.cache.commits import any_committed
from civt_cache.cache.layout import build_cache, layout_differences, metadata_problems, publish, rewrite_metadata
from civt_cache.cache.objects import CacheRoot
from civt_cache.cache.spec import CacheSpec
from civt_cache.cache.store import CacheStore, identity_differences
from civt_cache.errors import CacheMismatchError, CorruptUnitError


def create_or_open(root: str | Path, spec: CacheSpec, teachers: Sequence[dict[str, Any]] = (),
                   log: Callable[[str], None] | None = None, repair: bool = False) -> CacheStore:
    """The cache at ``root`` for ``spec`` with the empty arrays of each teacher identity in
    ``teachers``: made when absent or pinned by nothing, else opened, grown or refused saying
    what differs. Damaged array metadata is refused naming the object, or with ``repair``
    written again from the cache's own settings."""
    objects = CacheRoot(root)
    if not objects.exists("zarr.json"):
        publish(objects, "", lambda tmp: build_cache(tmp, spec))
    store = CacheStore.open(root, mode="r+")
    stored = _checked_teachers(store, repair, log)
    differs = ([] if store.spec.grows_to(spec) else store.spec.differences(spec)) + [
        f"teacher {t['name']!r} {diff}" for t in teachers if t["name"] in stored
        for diff in identity_differences(stored[t["name"]], t)]
    if differs and not _pinned(objects):
        if log is not None:
            log(f"{root}: holds no committed unit, so it is made again with this run's settings "
                f"(it had: {'; '.join(differs)})")
        _remake(objects, spec)
        store = CacheStore.open(root, mode="r+")
    torn = layout_differences(store.group, store.spec)
    if torn:
        raise CacheMismatchError(f"{root}: its arrays do not match its own settings ({'; '.join(torn)}): "
                                 "two processes created it with different settings at once; remove it and "
                                 "run cache-teachers again")
    if store.spec.grows_to(spec):
        store = store.grow(spec.epochs)
        spec = replace(spec, epochs_per_unit=store.spec.epochs_per_unit)
    store.check_spec(spec)
    for identity in teachers:
        store.ensure_teacher(identity)
    return store


def _checked_teachers(store: CacheStore, repair: bool, log: Callable[[str], None] | None) -> dict[str, dict[str, Any]]:
    """The cache's teachers' identities, once its array metadata is known sound: damaged
    metadata is refused naming the object, or with ``repair`` written again (it follows from
    the cache's settings and its teachers' identities)."""
    try:
        identities = store.teachers()
    except (ValueError, KeyError):  # the teachers group's own metadata is the damaged one
        identities = {}
    broken = metadata_problems(store.objects, list(identities))
    if not broken:
        return identities
    if not repair:
        key, why = next(iter(broken.items()))
        raise CorruptUnitError(f"{store.objects.name(key)}: array metadata {why}"
                               + (f" (and {len(broken) - 1} more)" if len(broken) > 1 else "")
                               + "; `cache-teachers --repair` writes it again from the cache's settings")
    rewrite_metadata(store.objects, store.spec, list(broken), identities)
    if not identities:  # the teachers group is readable now: its teachers' arrays next
        identities = store.teachers()
        rewrite_metadata(store.objects, store.spec, list(metadata_problems(store.objects, list(identities))),
                         identities)
    if log is not None:
        log(f"--repair: wrote {', '.join(str(store.objects.name(k)) for k in broken)} again from the cache's settings")
    return identities


def _pinned(objects: CacheRoot) -> bool:
    """Whether the cache holds work: a committed unit, or a lease of a unit being computed."""
    return any_committed(objects) or bool(objects.listing("leases"))


def _remake(objects: CacheRoot, spec: CacheSpec) -> None:
    """Overwrite the cache's metadata with ``spec``'s and drop its teachers (their arrays' shapes
    follow the settings; ``ensure_teacher`` makes them again). Chunks of uncommitted units may
    stay behind: nothing reads a chunk before its unit's commit, and a unit's computation
    rewrites all of its chunks."""
    for key in objects.listing("teachers"):
        objects.delete(key)
    publish(objects, "", lambda tmp: build_cache(tmp, spec), replace=True)
