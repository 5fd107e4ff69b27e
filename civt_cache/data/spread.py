"""How a data set's labels are spread over its shards, recorded in its manifest, so that shards
written class by class are found from the manifest alone, before any shard is read.

Shards made by other tools are often written class by class. Both stages read a shard at a time
and pair Mixup/CutMix partners inside a shard (docs/cache-format.md), so such shards give
near-single-class batches and partners of the same class (measured: batches held 2.2 classes and
67% of partners shared the class). A shard of n samples drawn from the data's label distribution
p would hold sum_c 1 - (1 - p_c)^n classes on average; a shard holding less than half of that
counts as sorted, and a data set with at least half of its shards sorted is refused by
``cache-teachers`` and ``train-student`` unless asked to proceed.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from civt_cache.errors import ConfigError, ManifestError

#: The flag that takes sorted shards deliberately (both stages).
ALLOW_FLAG = "--allow-sorted-shards"


@dataclass(frozen=True)
class LabelSpread:
    """Samples per class over all shards, and per shard: classes held, samples of its largest."""

    class_counts: tuple[int, ...]
    shards: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, label_counts: Sequence[Counter], num_classes: int) -> LabelSpread:
        """From each shard's label counts (as a scan or a writer tallies them)."""
        total = Counter()
        for counts in label_counts:
            total.update(counts)
        return cls(tuple(total.get(c, 0) for c in range(num_classes)),
                   tuple((len(c), max(c.values(), default=0)) for c in label_counts))

    def to_json(self) -> dict[str, Any]:
        return {"class_counts": list(self.class_counts), "shards": [list(s) for s in self.shards]}

    @classmethod
    def from_json(cls, raw: Any, where: str, num_shards: int, num_classes: int) -> LabelSpread | None:
        """A manifest's ``label_spread``; None where it no longer covers the manifest's shards and
        classes (a manifest edited by hand, e.g. to a subset of its shards): then it says nothing
        and the manifest's own checks speak."""
        try:
            counts = tuple(int(c) for c in raw["class_counts"])
            shards = tuple((int(k), int(top)) for k, top in raw["shards"])
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"{where}: malformed label_spread ({type(e).__name__}: {e})") from None
        if len(counts) != num_classes or len(shards) != num_shards:
            return None
        return cls(counts, shards)

    def sorted_shards(self, sizes: Sequence[int]) -> list[tuple[int, int, float, float]]:
        """(shard, classes held, about how many shuffled data would hold, largest class share) of
        each shard (samples ``sizes[i]``) that holds under half the shuffled count. The shuffled
        count depends on a shard's size alone, so it is computed once per size (ImageNet's 1,025
        shards have two), not once per shard and class at every stage's start."""
        p = np.array([c for c in self.class_counts if c], np.float64) / sum(self.class_counts)
        expected = {n: float(np.sum(1.0 - (1.0 - p) ** n)) for n in set(sizes)}
        return [(i, held, expected[n], top / n) for i, ((held, top), n) in enumerate(zip(self.shards, sizes))
                if held < 0.5 * expected[n]]

    def sorted_message(self, names: Sequence[str], sizes: Sequence[int]) -> str | None:
        """A message naming the sorted shards when at least half of them look sorted, else None."""
        if sum(1 for c in self.class_counts if c) < 2:
            return None
        rows = self.sorted_shards(sizes)
        if 2 * len(rows) < len(self.shards):
            return None
        lines = [f"{len(rows)} of {len(self.shards)} shards look sorted by class: batches and Mixup/CutMix "
                 "partners (paired inside a shard) would be nearly single-class. Label spread:"]
        lines += [f"  {os.path.basename(names[i])}: {sizes[i]} samples, {held} classes (about {e:.0f} if "
                  f"shuffled), largest class {100 * share:.0f}%" for i, held, e, share in rows[:8]]
        if len(rows) > 8:
            lines.append(f"  ... and {len(rows) - 8} more shards")
        return "\n".join(lines)


FIX = "rewrite them shuffled: `civt-cache make-shards MANIFEST OUT_DIR --name NAME`"


def refuse_sorted_shards(manifest: Any, where: str, allow: bool, log: Any = None) -> None:
    """Refuse a manifest whose shards look sorted by class, naming the fix and the flag; with
    ``allow``, say so once and go on. A manifest without a recorded spread (written before
    manifests held one) is not judged: ``scan-shards`` adds it."""
    spread: LabelSpread | None = manifest.label_spread
    if spread is None:
        return
    said = spread.sorted_message([s.path for s in manifest.shards], [s.num_samples for s in manifest.shards])
    if said is None:
        return
    if not allow:
        raise ConfigError(f"{where}: {said}\nFix: {FIX}; or pass {ALLOW_FLAG} to train on them as they are.")
    if log is not None:
        log(f"warning: {ALLOW_FLAG}: {where}: {said.splitlines()[0]}")
