"""Work shared by any number of processes: leases on units (``cache.leases``), taken one at a
time, renewed, taken over when expired or when their owner died; ``inspect`` and ``verify
--full`` say what is committed, leased and missing."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from civt_cache import load_manifest
from civt_cache.cache.leases import Leases, claim_units, this_process
from civt_cache.cache.create import create_or_open
from civt_cache.cache.spec import CacheSpec
from civt_cache.cache.store import CacheStore
from civt_cache.views.recipe import Recipe
from tests.conftest import cache_args, run_cli
from tests.test_faults import arrays

HOST = socket.gethostname()


def _lease_file(root: Path, shard: int, block: int, generation: int) -> Path:
    return root / "leases" / f"s{shard:06d}-b{block:04d}.g{generation:04d}.json"


def test_a_lease_is_exclusive_renewed_and_taken_over_once_expired(tmp_path) -> None:
    a, b = Leases(tmp_path, "node-a:11", 60), Leases(tmp_path, "node-b:22", 60)
    held = a.acquire(0, 0)
    assert held is not None and held.generation == 0
    assert b.acquire(0, 0) is None  # live: nobody else gets it
    renewed = a.renew(held)
    assert renewed is not None and renewed.expires >= held.expires and a.holds(renewed)
    # node-a stops renewing (a crash on another host): its lease runs out
    _lease_file(tmp_path, 0, 0, 0).write_text(json.dumps({"owner": "node-a:11", "expires": time.time() - 1}))
    taken = b.acquire(0, 0)
    assert taken is not None and (taken.generation, taken.owner) == (1, "node-b:22")
    assert not a.holds(held) and a.renew(held) is None  # node-a, back, learns it lost the unit
    assert a.acquire(0, 0) is None
    assert Leases(tmp_path, "anyone").all() == {(0, 0): taken}
    b.release(taken)
    assert Leases(tmp_path, "anyone").all() == {} and not list((tmp_path / "leases").glob("*.json"))


def test_a_lease_of_a_dead_local_process_is_taken_at_once(tmp_path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert Leases(tmp_path, f"{HOST}:{gone.pid}", 3600).acquire(1, 0) is not None
    assert Leases(tmp_path, this_process(), 3600).acquire(1, 0).generation == 1
    # a live local owner (this process) keeps its unit
    assert Leases(tmp_path, f"{HOST}:{os.getppid()}", 3600).acquire(1, 0) is None


def test_two_claimers_share_units_and_take_over_expired_ones(world, tmp_path) -> None:
    """Interleaved claimers take disjoint units, one at a time, passing over the units the other
    holds; a unit whose holder stalled past its lease is taken over, so every unit is done once."""
    manifest = load_manifest(world["manifest"])
    spec = CacheSpec.for_manifest(manifest, Recipe(img_size=32), 0, 2, 1, 5)
    store = create_or_open(tmp_path / "c", spec)
    units = store.units()
    node_a, node_b = Leases(store.root, "node-a:1", 0.5), Leases(store.root, "node-b:2", 60)
    a = claim_units(store, node_a, units, ["conv"])
    b = claim_units(store, node_b, units[2:] + units[:2], ["conv"])

    def commit(unit: tuple[int, int]) -> None:
        store.commit_unit(*unit, 1, {"sha256": "-"}, {"conv": {"sha256": "-"}}, False)

    ua, _, la = next(a)
    ub, _, lb = next(b)
    assert (ua, ub) == (units[0], units[2]) and la.owner == "node-a:1" and lb.owner == "node-b:2"
    commit(ua)
    node_a.release(la)
    ua2, _, _ = next(a)  # node-a takes the next free unit, then stalls without committing it
    assert ua2 == units[1]
    commit(ub)
    node_b.release(lb)
    rest = [u for u, _, _ in b]  # node-b passes over node-a's live lease
    for u in rest:
        commit(u)
    assert rest == [units[3]] and store.unit_record(*ua2) is None
    time.sleep(0.6)  # node-a's lease runs out
    (unit, _, lease), = list(claim_units(store, node_b, units, ["conv"]))
    assert unit == ua2 and (lease.generation, lease.owner) == (1, "node-b:2")
    assert list(claim_units(store, node_a, units, ["conv"])) == []  # node-b holds it now


def _units_done(stdout: str) -> int:
    return int(re.search(r"rank 0: (\d+) unit\(s\)", stdout).group(1))


def test_independent_claiming_jobs_split_a_cache(world, tmp_path) -> None:
    """Two jobs started apart (as a SLURM array would) on one cache: each does some units,
    none is done twice, and the cache equals one made by a single process."""
    out = tmp_path / "c"
    cmd = [sys.executable, "-m", "civt_cache.cli", *cache_args(world["root"], out, "--claim", "--epochs", "4")]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [r[1][-2000:] for r in results]
    done = [_units_done(r[0]) for r in results]
    assert sum(done) == 8 and min(done) >= 1, done
    assert "all 8 unit(s) complete, all sound -> OK" in run_cli("verify", str(out), "--full").stdout
    ref, got = arrays(world["ref"]), arrays(out)
    for k in ref:  # the 2-epoch reference is the first 2 epochs (blocks) of this cache
        assert np.array_equal(ref[k], got[k][: ref[k].shape[0]], equal_nan=ref[k].dtype.kind == "f"), k
    assert not list((out / "leases").glob("*.json"))


def test_a_killed_claimer_is_finished_after_its_lease_expires(world, tmp_path) -> None:
    """SIGKILL mid-unit: the cache is incomplete and ``verify --full`` fails listing the units
    (one leased); a rerun waits out the lease (here forged onto another host, 3 s left), takes
    the unit over and finishes; the result equals the uninterrupted cache."""
    out = tmp_path / "c"
    proc = subprocess.Popen([sys.executable, "-m", "civt_cache.cli", *cache_args(world["root"], out, "--claim")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((out / "leases").glob("*.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    leased = sorted((out / "leases").glob("*.json"))
    assert leased, "the process finished before it could be killed"
    expires = time.time() + 3
    for path in leased:
        path.write_text(json.dumps({"owner": "node-b:4242", "expires": expires}))
    failed = run_cli("verify", str(out), "--full", check=False)
    assert failed.returncode == 1 and "incomplete" in failed.stdout and "FAILED" in failed.stdout
    assert "leased by node-b:4242" in failed.stdout and "lacks" in failed.stdout
    assert "leased by node-b:4242" in run_cli("inspect", str(out)).stdout
    run_cli(*cache_args(world["root"], out, "--claim", "--lease-seconds", "5"))
    assert time.time() >= expires  # it waited for the lease rather than computing beside it
    assert "all 4 unit(s) complete, all sound -> OK" in run_cli("verify", str(out), "--full").stdout
    ref, got = arrays(world["ref"]), arrays(out)
    for k in ref:
        assert np.array_equal(ref[k], got[k], equal_nan=ref[k].dtype.kind == "f"), k


def test_leases_without_hard_links_are_still_exclusive(tmp_path, monkeypatch) -> None:
    """Filesystems without hard links (some network mounts): the lease is an O_EXCL create."""
    from civt_cache.cache import leases as module

    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(module.os, "link", no_links)
    a, b = Leases(tmp_path, "node-a:1", 60), Leases(tmp_path, "node-b:2", 60)
    held = a.acquire(3, 1)
    assert held is not None and a.holds(held) and b.acquire(3, 1) is None
    assert not list((tmp_path / "leases").glob(".lease-*"))  # no temp file left behind


def test_the_newest_generation_is_read_by_number(tmp_path) -> None:
    """A unit taken over 10,000 times: generation 10000 is newer than 9999 (not by name order)."""
    (tmp_path / "leases").mkdir()
    for g, owner in ((9999, "old:1"), (10000, "new:2")):
        _lease_file(tmp_path, 0, 0, g).write_text(json.dumps({"owner": owner, "expires": time.time() + 60}))
    assert Leases(tmp_path, "x").current(0, 0).owner == "new:2"
    assert Leases(tmp_path, "x").all()[(0, 0)].generation == 10000


def test_a_unit_is_committed_once_by_a_conditional_create(world, tmp_path) -> None:
    """Two processes that computed the same unit (a lease taken over while its holder stalled):
    the first commit creates the record; the second learns the first's record instead of
    silently replacing it (the stage then rewrites its objects and replaces the record whole);
    a record from before the cache grew counts as not committed and is replaced."""
    manifest = load_manifest(world["manifest"])
    spec = CacheSpec.for_manifest(manifest, Recipe(img_size=32), 0, 2, 1, 5)
    store = create_or_open(tmp_path / "c", spec)
    first = {"sha256": "a", "epochs": ["a"]}
    assert store.commit_unit(0, 0, 3, first, {}, False) is None
    theirs = store.commit_unit(0, 0, 3, {"sha256": "b", "epochs": ["b"]}, {}, False)
    assert theirs["views"] == first and store.unit_record(0, 0)["views"] == first
    assert store.commit_unit(0, 0, 3, first, {"conv": first}, True) is None  # a teacher added
    assert store.unit_record(0, 0)["teachers"] == {"conv": first}
    record = tmp_path / "c" / "progress" / "s000000-b0000.json"
    stale = json.loads(record.read_text())
    stale["epochs"] = [0, 1]  # as if made when block 0 had other epochs
    record.write_text(json.dumps(stale))
    assert store.unit_record(0, 0) is None
    assert store.commit_unit(0, 0, 3, first, {}, False) is None and store.unit_record(0, 0)["epochs"] == [0]


def test_start_up_reads_the_records_in_one_listing_and_the_index(world, tmp_path) -> None:
    """After stage one the index holds every record: a scan lists progress/ and reads the index,
    nothing else; a record replaced since (a teacher taken out by a repair) is read again on its
    own, and what the scan returns is the record as it is now. A process scans again (a
    claimer's rounds) with a listing and the records changed since its last scan."""
    import shutil

    cache = tmp_path / "c"
    shutil.copytree(world["ref"], cache)
    store = CacheStore.open(cache)
    store.commits.all(save_index=True)  # the reference cache predates nothing: make sure it has one
    assert (cache / "progress" / "index.json.gz").exists()
    reads: list[str] = []
    real = store.objects.read
    store.objects.read = lambda key: reads.append(key) or real(key)
    records = store.commits.all()
    assert reads == ["progress/index.json.gz"] and len(records) == 4
    store.uncommit(1, 1, ["conv"])
    reads.clear()
    records = store.commits.all()  # the index is as this process read it: only the new record
    assert reads == ["progress/s000001-b0001.json"]
    assert records[(1, 1)]["teachers"] == {} and records[(0, 0)]["teachers"].keys() == {"conv"}
    reads.clear()
    assert store.commits.all() == records and reads == []  # --claim's next round: a listing only


def test_a_cache_created_twice_at_once_with_other_settings_is_refused(world, tmp_path) -> None:
    """Two processes create one cache at once with other settings: both write their array
    metadata, then one creates the group. When the loser's metadata landed last, the winner's
    cache is refused naming the array, before any unit is written in the wrong shape."""
    from civt_cache.cache.layout import build_cache, publish
    from civt_cache.errors import CacheMismatchError

    manifest = load_manifest(world["manifest"])
    mine = CacheSpec.for_manifest(manifest, Recipe(img_size=32), 0, 2, 1, 5)
    theirs = CacheSpec.for_manifest(manifest, Recipe(img_size=32), 0, 4, 2, 5)
    root = tmp_path / "c"
    store = create_or_open(root, mine)
    publish(store.objects, "late/", lambda tmp: build_cache(tmp, theirs))  # their metadata, landed last
    for name in ("views/params/zarr.json", "views/samples/zarr.json"):
        (root / name).write_bytes((root / "late" / name).read_bytes())
    with pytest.raises(CacheMismatchError, match=r"views/params is int32 \(4, .*two processes created it"):
        create_or_open(root, mine)
