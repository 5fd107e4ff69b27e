"""What a teacher cache is: its identity (data, recipe, seed, epochs, k), the versions of what
it stores, and the sample-identity contract every reader checks. Two specs must agree (or one
must be the other grown to more epochs) for a cache to be reused; ``cache_store`` owns how it
is laid out on disk."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from civt_cache.data.manifest import DataManifest
from civt_cache.errors import CacheMismatchError
from civt_cache.fsutil import canonical_sha256
from civt_cache.views.recipe import Recipe
from civt_cache.views.records import VIEWS_VERSION

SCHEMA_VERSION = 5  # 2: crc32c on every chunk, fill values no real entry can have; 3: log-probs;
# 4: per-epoch arrays sharded one object per unit (an inner chunk per epoch), per-epoch checksums;
# 5: one array per teacher (log-probs, indices, lse as float32 rows), key hashes with labels
# Teachers' top-k are stored as log-probabilities, logit - lse <= 0, so no finite logit overflows
# float16 (a logit of 1e5 would be +inf); a log-probability below float16's lowest is clamped
# there, where exp() is 0 in any float type anyway.
FP16_LOWEST = float(np.finfo(np.float16).min)
#: The most classes a cache holds: a teacher's class indices are stored exactly in float32
#: (``cache.layout``), which holds every integer up to 2**24.
MAX_CLASSES = 2 ** 24

def key_hash(key: str) -> int:
    """64-bit hash of a sample key, stored per row so readers can assert alignment."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def check_alignment(cache: Path, manifest: DataManifest, shard: int, samples: Sequence[Any],
                    hashes: np.ndarray, labels: np.ndarray) -> None:
    """Refuse a shard whose samples are not the cached ones: every key hash and label must
    equal what the cache stored for that row, or no target of it can be trusted."""
    path = manifest.shard_path(shard)
    for pos, s in enumerate(samples):
        if key_hash(s.key) != int(hashes[pos]):
            raise CacheMismatchError(f"{path}: sample {pos} has key {s.key!r}, the cache {cache} "
                                     "holds another sample in that row; the shard changed after caching")
        if s.label != int(labels[pos]):
            raise CacheMismatchError(f"{path}: sample {s.key!r} has label {s.label}, the cache "
                                     f"{cache} was built with label {int(labels[pos])}; the shard "
                                     "changed after caching")


def stored_versions(root: Path) -> tuple[int, int] | None:
    """(schema, views version) a cache directory was made with (None: no cache there), to tell
    a cache this civt-cache cannot read from one it can."""
    try:
        attrs = json.loads((Path(root) / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError):
        return None
    if attrs.get("kind") != "civt-cache":
        return None
    return attrs.get("schema_version", 1), attrs.get("views_version", 1)


def recipe_changes(stored: Recipe, asked: Recipe) -> str:
    """What differs between two recipes, key by key: 'img_size: 32 -> 224, ...'."""
    a, b = stored.to_json(), asked.to_json()
    return ", ".join(f"{k}: {a[k]!r} -> {b[k]!r}" for k in a if a[k] != b[k])


@dataclass(frozen=True)
class CacheSpec:
    """What a cache is built for; two specs must agree for a cache to be reused."""

    manifest_name: str
    manifest_fingerprint: str
    num_shards: int
    row_stride: int
    recipe: Recipe
    seed: int
    epochs: int
    epochs_per_unit: int
    topk: int
    num_classes: int
    manifest_path: str = field(default="", compare=False)  # where to find the data again (verify)

    @classmethod
    def for_manifest(cls, manifest: DataManifest, recipe: Recipe, seed: int, epochs: int,
                     epochs_per_unit: int, topk: int) -> "CacheSpec":
        if epochs < 1 or epochs_per_unit < 1:
            raise CacheMismatchError(f"epochs ({epochs}) and epochs_per_unit ({epochs_per_unit}) must be >= 1")
        if not 1 <= topk <= manifest.num_classes:
            raise CacheMismatchError(f"topk {topk} must be between 1 and the {manifest.num_classes} classes")
        if manifest.num_classes > MAX_CLASSES:
            raise CacheMismatchError(f"{manifest.location or manifest.name}: {manifest.num_classes} classes; "
                                     f"a cache holds at most {MAX_CLASSES:,} (class indices are float32)")
        return cls(manifest.name, manifest.fingerprint(), len(manifest.shards), manifest.row_stride,
                   recipe, seed, epochs, min(epochs_per_unit, epochs), topk, manifest.num_classes,
                   str(manifest.location or ""))

    @property
    def num_rows(self) -> int:
        return self.num_shards * self.row_stride

    @property
    def num_blocks(self) -> int:
        return -(-self.epochs // self.epochs_per_unit)

    def block_epochs(self, block: int) -> range:
        """The epochs of block ``block`` (the last block of a cache may be short)."""
        b = self.epochs_per_unit
        return range(block * b, min((block + 1) * b, self.epochs))

    def attrs(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "kind": "civt-cache", "views_version": VIEWS_VERSION,
                "manifest": {"name": self.manifest_name, "fingerprint": self.manifest_fingerprint,
                             "num_shards": self.num_shards, "row_stride": self.row_stride,
                             "path": self.manifest_path},
                "recipe": self.recipe.to_json(),
                "recipe_fingerprint": canonical_sha256({"recipe": self.recipe.to_json(),
                                                        "views_version": VIEWS_VERSION}),
                "seed": self.seed, "epochs": self.epochs, "epochs_per_unit": self.epochs_per_unit,
                "topk": self.topk, "num_classes": self.num_classes}

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> "CacheSpec":
        m = attrs["manifest"]
        return cls(m["name"], m["fingerprint"], m["num_shards"], m["row_stride"],
                   Recipe.from_json(attrs["recipe"]), attrs["seed"], attrs["epochs"],
                   attrs["epochs_per_unit"], attrs["topk"], attrs["num_classes"], m.get("path", ""))

    def grows_to(self, asked: "CacheSpec") -> bool:
        """Whether ``asked`` is this cache with more epochs (and nothing else changed): such a
        cache is grown in place. Its epochs per unit stay as stored (the chunk shape), which
        differs from the asked one only where a short cache clamped it to its epochs."""
        b_ok = min(asked.epochs_per_unit, self.epochs) == self.epochs_per_unit
        same = replace(asked, epochs=self.epochs, epochs_per_unit=self.epochs_per_unit)
        return asked.epochs > self.epochs and b_ok and not self.differences(same)

    def data_differences(self, fingerprint: str, name: str, recipe: Recipe) -> list[str]:
        """What differs in the data (manifest fingerprint) and the view recipe: what every user
        of a cache, stage one or two, must match."""
        out = []
        if self.manifest_fingerprint != fingerprint:
            out.append(f"data manifest: cache built for {self.manifest_name!r} "
                       f"({self.manifest_fingerprint[:12]}), asked for {name!r} ({fingerprint[:12]})")
        if self.recipe != recipe:
            out.append(f"view recipe differs (cache -> asked: {recipe_changes(self.recipe, recipe)})")
        return out

    def differences(self, other: "CacheSpec") -> list[str]:
        """Human-readable list of what differs between a stored spec (self) and a request."""
        out = self.data_differences(other.manifest_fingerprint, other.manifest_name, other.recipe)
        for name in ("seed", "epochs", "epochs_per_unit", "topk", "num_classes", "row_stride"):
            if getattr(self, name) != getattr(other, name):
                out.append(f"{name}: cache has {getattr(self, name)}, asked {getattr(other, name)}")
        return out
