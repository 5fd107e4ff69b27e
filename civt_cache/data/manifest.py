"""The data manifest: which shards make a dataset, in which order, and how samples map to rows.

A manifest is the root of sample identity (docs/cache-format.md). Its shards are listed in a fixed order;
shard ``i`` owns the global rows ``[shard_base(i), shard_base(i) + num_samples)``. Every shard's
range starts on a multiple of ``row_stride`` (the largest shard rounded up to ``ROW_ALIGN``), so
one cache chunk along the row axis holds exactly one shard and rows past a shard's end are padding.
"""
from __future__ import annotations

import json
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from civt_cache.data.spread import LabelSpread, refuse_sorted_shards
from civt_cache.data.remote import REMOTE_SCHEMES, read_remote, remote_scheme, require_pipe_allowed, write_remote
from civt_cache.errors import ManifestError
from civt_cache.fsutil import atomic_write_bytes, canonical_sha256, json_bytes, refuse_url

ROW_ALIGN = 64
MANIFEST_VERSION = 1
#: Bounds a manifest's numbers must keep: far above any real data set (ImageNet-21k has 21,841
#: classes; shards hold thousands of samples), far below what would make a reader allocate
#: without end (a label of 10^12 turned into 10^12 class names).
MAX_CLASSES = 1 << 20
MAX_SHARD_SAMPLES = 10_000_000
MAX_SHARD_BYTES = 1 << 44
MAX_MANIFEST_BYTES = 1 << 30


def data_location(text: str | Path) -> Path | str:
    """Where a manifest or shard is: a URL of a scheme shards are read from stays text (a Path
    would fold ``s3://b`` into ``s3:/b``), anything else is a Path."""
    return text if isinstance(text, str) and remote_scheme(text) else Path(text)


@dataclass(frozen=True)
class ShardInfo:
    """One shard as the manifest records it (path relative to the manifest's directory)."""

    path: str
    num_samples: int
    bytes: int
    sha256: str


@dataclass
class DataManifest:
    """A typed view of ``data_manifests/NAME.json``; see the module docstring for the row mapping."""

    name: str
    classes: list[str]
    shards: list[ShardInfo]
    source: str = ""
    seed: int | None = None
    encoding: dict[str, Any] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    label_key: str = "cls"  # where a sample's label is: its .cls, its .txt, or json:FIELD of its .json
    label_spread: LabelSpread | None = None  # classes per shard (``data.spread``); not identity
    location: Path | str | None = None  # the manifest file (or URL) this was read from / written to

    # ---- identity -------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def fingerprint(self) -> str:
        """Hash of what defines the samples (classes, shard order, counts, checksums).

        Paths and the manifest's own location are left out so a dataset can be moved.
        """
        return canonical_sha256(
            {"classes": self.classes,
             "shards": [[s.num_samples, s.sha256] for s in self.shards]})

    # ---- row mapping ----------------------------------------------------------------------
    @property
    def row_stride(self) -> int:
        """Rows reserved per shard: the largest shard rounded up to ``ROW_ALIGN``."""
        largest = max((s.num_samples for s in self.shards), default=1)
        return max(ROW_ALIGN, -(-largest // ROW_ALIGN) * ROW_ALIGN)

    @property
    def num_rows(self) -> int:
        """Total rows including padding (the length of every per-row cache array)."""
        return len(self.shards) * self.row_stride

    def shard_base(self, shard: int) -> int:
        """First global row of ``shard``."""
        return shard * self.row_stride

    def row_of(self, shard: int, position: int) -> int:
        """Global row of the ``position``-th sample of ``shard``."""
        if not 0 <= position < self.shards[shard].num_samples:
            raise IndexError(f"position {position} outside shard {shard} "
                             f"({self.shards[shard].num_samples} samples)")
        return self.shard_base(shard) + position

    def locate(self, row: int) -> tuple[int, int]:
        """(shard, position) of a global row; raises for padding rows."""
        shard, position = divmod(row, self.row_stride)
        if shard >= len(self.shards) or position >= self.shards[shard].num_samples:
            raise IndexError(f"row {row} is padding or out of range")
        return shard, position

    # ---- files ----------------------------------------------------------------------------
    def shard_path(self, shard: int) -> Path | str:
        """Absolute path of a shard (manifest paths are relative to the manifest's folder), or
        its URL (a relative path in a manifest read from a URL is relative to that URL)."""
        if remote_scheme(self.shards[shard].path):
            return self.shards[shard].path
        if isinstance(self.location, str):
            return f"{self.location.rsplit('/', 1)[0]}/{self.shards[shard].path}"
        p = Path(self.shards[shard].path)
        if not p.is_absolute() and self.location is not None:
            p = self.location.parent / p
        return p

    def check_shard_file(self, shard: int) -> Path | str:
        """The shard's path, once ``stat`` shows a regular file of exactly the listed size:
        nothing is opened before that, so a device (/dev/zero) or a FIFO in a manifest is refused
        instead of read without end or waited on. A URL is returned as it is: its one read is
        bounded and checked for the listed size (``shards.read_shard``), so no request is spent here."""
        info, path = self.shards[shard], self.shard_path(shard)
        if isinstance(path, str):
            if remote_scheme(path) == "pipe":
                require_pipe_allowed(path)
            return path
        try:
            st = path.stat()
        except FileNotFoundError:
            raise ManifestError(f"{path}: shard listed in manifest {self.location} is missing") from None
        except OSError as e:
            raise ManifestError(f"{path}: cannot stat shard ({e.strerror or e})") from None
        if not stat.S_ISREG(st.st_mode):
            raise ManifestError(f"{path}: shard listed in manifest {self.location} is not a regular file")
        if st.st_size != info.bytes:
            raise ManifestError(f"{path}: size {st.st_size} differs from manifest ({info.bytes} bytes)")
        return path

    def check_shard_files(self) -> None:
        """``check_shard_file`` for every shard (a ``stat`` each; a ``pipe:`` URL refused unless
        allowed): run before a command creates anything, so a manifest pointing at a missing
        file, a device or a FIFO is refused without leaving an empty cache or run folder behind."""
        for shard in range(len(self.shards)):
            self.check_shard_file(shard)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": MANIFEST_VERSION,
            "name": self.name,
            "source": self.source,
            "seed": self.seed,
            "classes": self.classes,
            "num_classes": self.num_classes,
            "num_samples": self.num_samples,
            "encoding": self.encoding,
            "shards": [asdict(s) for s in self.shards],
            "skipped": self.skipped,
            **({"label_key": self.label_key} if self.label_key != "cls" else {}),
            **({"label_spread": self.label_spread.to_json()} if self.label_spread else {}),
        }

    def save(self, path: str | Path) -> None:
        """Write atomically (a file renamed into place, or one PUT), so no reader ever sees a
        manifest for shards not fully written."""
        where = data_location(path)
        self.location = where if isinstance(where, str) else where.resolve()
        if isinstance(self.location, str):
            write_remote(self.location, json_bytes(self.to_json()))
        else:
            atomic_write_bytes(self.location, json_bytes(self.to_json()))


def _manifest_bytes(path: Path | str) -> bytes:
    if isinstance(path, str):
        return read_remote(path, MAX_MANIFEST_BYTES)  # a missing object: "no such object"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest not found") from None
    except IsADirectoryError:
        raise ManifestError(f"{path}: is a directory, not a manifest file") from None


def check_label_key(key: str, where: str) -> str:
    """``cls``, ``txt`` or ``json:FIELD``: the member (or JSON field, ``json:meta.label`` one
    inside another) holding a sample's label, an integer or a class name, as WebDataset users
    store it (``.cls``, ``.txt``, Hugging Face-style ``.json``)."""
    if key in ("cls", "txt") or (key.startswith("json:") and len(key) > 5 and "" not in key[5:].split(".")):
        return key
    raise ManifestError(f"{where}: label key {key!r}: 'cls', 'txt' or 'json:FIELD' (e.g. json:label, "
                        "json:meta.label)")


def class_difference(ours: list[str], theirs: list[str]) -> str | None:
    """How two class lists differ (count, or the first name that differs), or None when they
    are the same names in the same order. Labels are indices into these lists, so a val split
    with other classes would score a model against the wrong names."""
    if ours == theirs:
        return None
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            return f"class {i} is {a!r} in one and {b!r} in the other"
    return f"{len(ours)} classes against {len(theirs)}"


def require_same_classes(train: DataManifest, train_name: str, val: DataManifest, val_name: str) -> None:
    """Refuse a validation manifest whose classes (names and order) are not the training
    manifest's, naming the first difference."""
    diff = class_difference(train.classes, val.classes)
    if diff is not None:
        raise ManifestError(f"{val_name}: its classes do not match the training manifest {train_name}'s "
                            f"({diff}); make both with the same --classes list")


def load_manifest(path: str | Path) -> DataManifest:
    """Read and validate a manifest (a file, or an s3:// / gs:// / https:// URL); errors name
    it and the problem."""
    path = data_location(path)
    try:
        raw = json.loads(_manifest_bytes(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ManifestError(f"{path}: not a manifest (JSON nested too deeply)") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: not a manifest (a JSON object is expected)")
    classes = raw.get("classes")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ManifestError(f"{path}: 'classes' must be a list of class names (strings)")
    if not classes:
        raise ManifestError(f"{path}: lists no classes")
    if len(classes) > MAX_CLASSES:
        raise ManifestError(f"{path}: {len(classes):,} classes, more than {MAX_CLASSES:,}")
    entries = raw.get("shards")
    if not isinstance(entries, list) or not entries:
        raise ManifestError(f"{path}: lists no shards ('shards' must be a non-empty list)")
    shards = [_shard_entry(path, i, e) for i, e in enumerate(entries)]
    _refuse_duplicates(path, shards)
    try:
        m = DataManifest(name=str(raw["name"]), classes=classes, shards=shards,
                         source=str(raw.get("source", "")), seed=raw.get("seed"),
                         encoding=dict(raw.get("encoding", {})),
                         skipped=list(raw.get("skipped", [])),
                         label_key=check_label_key(str(raw.get("label_key", "cls")), str(path)),
                         location=path if isinstance(path, str) else path.resolve())
    except (KeyError, TypeError, ValueError) as e:
        raise ManifestError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from None
    if "label_spread" in raw:
        m.label_spread = LabelSpread.from_json(raw["label_spread"], str(path), len(shards), len(classes))
    if "num_samples" in raw and raw["num_samples"] != m.num_samples:
        raise ManifestError(f"{path}: num_samples {raw['num_samples']!r} != sum over shards "
                            f"{m.num_samples}")
    return m


def load_training_manifest(path: str | Path, allow_sorted: bool, log: Any = None) -> DataManifest:
    """The training manifest of either stage, checked before anything is created: every local
    shard file there, and shards not sorted by class unless ``allow_sorted`` (``data.spread``)."""
    manifest = load_manifest(path)
    manifest.check_shard_files()
    refuse_sorted_shards(manifest, str(path), allow_sorted, log)
    return manifest


def _count(path: Path | str, where: str, value: Any, high: int) -> int:
    """A whole number in 1..high, or a one-line refusal (JSON's 1e400 is a float, infinity)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ManifestError(f"{path}: {where} is {value!r}, not a whole number")
    if not 1 <= value <= high:
        raise ManifestError(f"{path}: {where} is {value:,}, outside 1..{high:,}")
    return value


def _shard_entry(path: Path | str, i: int, entry: Any) -> ShardInfo:
    if not isinstance(entry, dict):
        raise ManifestError(f"{path}: shard {i} is not an object")
    try:
        name, digest = entry["path"], entry["sha256"]
        n, size = entry["num_samples"], entry["bytes"]
    except KeyError as e:
        raise ManifestError(f"{path}: shard {i} has no {e.args[0]!r}") from None
    if not isinstance(name, str) or not name:
        raise ManifestError(f"{path}: shard {i} path {name!r} is not a file name")
    refuse_url(name, f"{path}: shard {i}", allowed=REMOTE_SCHEMES)
    if not isinstance(digest, str) or len(digest) != 64:
        raise ManifestError(f"{path}: shard {i} ({name}) sha256 {digest!r} is not a hex digest")
    return ShardInfo(name, _count(path, f"shard {i} ({name}) num_samples", n, MAX_SHARD_SAMPLES),
                     _count(path, f"shard {i} ({name}) bytes", size, MAX_SHARD_BYTES), digest)


def _refuse_duplicates(path: Path | str, shards: list[ShardInfo]) -> None:
    """A shard listed twice (same file, or the same bytes under two names) would train every
    sample in it twice per epoch."""
    seen: dict[str, int] = {}
    for i, sh in enumerate(shards):
        for ident in (f"path {sh.path}", f"sha256 {sh.sha256}"):
            if ident in seen:
                raise ManifestError(f"{path}: shards {seen[ident]} and {i} are the same shard "
                                    f"({ident}); list each shard once")
            seen[ident] = i


def default_manifest_path(name: str) -> Path:
    """Where manifests go unless told otherwise: ``data_manifests/NAME.json`` in the cwd."""
    return Path("data_manifests") / f"{name}.json"
