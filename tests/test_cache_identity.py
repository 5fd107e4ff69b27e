"""The same cache, byte for byte, across refactors: the view records (and keys and labels) a
small cache commits have the checksums recorded when the code was laid out as it is, so a move
that changes what is sampled or stored fails here (issue: the house). The teachers' bytes are
left out: they depend on the CPU's kernels, not only on this code."""
from __future__ import annotations

import json

#: Per unit (shard, epoch block) of conftest's reference cache: the sha256 its commit records
#: for the views component (records, key hashes, labels). Recorded with the code as it stood
#: before the batched engine and the module moves (commit a5445ec), which gives the same.
RECORDED = {
    "s000000-b0000": "3369d509e8cec688f6412762337ad9a6",
    "s000000-b0001": "c45005e8d5ca8540daebb633328ffbb4",
    "s000001-b0000": "e87aa03b7efa8219cf9e6c351dd39eb4",
    "s000001-b0001": "8eb12d627f21ebed027c0c0db0a8cb73",
}


def test_views_of_a_small_cache_are_byte_identical(world) -> None:
    got = {}
    for path in sorted((world["ref"] / "progress").glob("*.json")):
        got[path.stem] = json.loads(path.read_text())["views"]["sha256"]
    assert got == RECORDED
