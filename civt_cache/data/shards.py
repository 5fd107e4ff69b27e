"""Reading WebDataset shards: one shard's samples as (key, image bytes, label) in stored order.

Shards are tar files (or gzip'd tars) in the WebDataset convention: members ``KEY.EXT`` grouped
by key, one image member (jpg/jpeg/png/webp) and the integer label per sample, in its ``.cls``
member, its ``.txt``, or a field of its ``.json`` (the manifest's ``label_key``).
The reader is deliberately strict, because a silently short shard would shift every row after
it: a truncated tar, a sample without image or label, or a bad label raises ``ShardError``
naming the shard and the key.
"""
from __future__ import annotations

import io
import json
import re
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

from civt_cache.data.manifest import MAX_CLASSES, DataManifest
from civt_cache.data.remote import read_local, read_remote, remote_scheme, remote_size
from civt_cache.errors import ManifestError, ShardError
from civt_cache.fsutil import sha256_bytes

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
LABEL_EXT = "cls"
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
_TAR_END = 1024  # two zero blocks end every complete tar archive


@dataclass(frozen=True)
class Sample:
    """One stored sample: its WebDataset key, the encoded image, and the integer label."""

    key: str
    image: bytes
    label: int


def sample_name(shard_path: Path | str, sample: Sample) -> str:
    """How errors name one sample: its shard file and key."""
    return f"{shard_path}: sample {sample.key!r}"


def split_member_name(name: str) -> tuple[str, str] | None:
    """WebDataset's rule: key = path up to the first dot of the basename; ext = the rest."""
    m = _KEY_RE.match(name)
    return (m.group(1), m.group(2).lower()) if m else None


def _finish_sample(shard: str, key: str, parts: dict[str, bytes], num_classes: int, label_key: str,
                   names: dict[str, int] | None) -> Sample:
    image_ext = next((e for e in IMAGE_EXTS if e in parts), None)
    if image_ext is None:
        raise ShardError(f"{shard}: sample {key!r} has no image member "
                         f"(one of {', '.join(IMAGE_EXTS)}); has {sorted(parts)}")
    label = _label(shard, key, parts, label_key, names)
    if not 0 <= label < num_classes:
        raise ShardError(f"{shard}: sample {key!r} has label {label}, outside the "
                         f"{num_classes:,} classes (0..{num_classes - 1})")
    return Sample(key, parts[image_ext], label)


def _label(shard: str, key: str, parts: dict[str, bytes], label_key: str, names: dict[str, int] | None) -> int:
    """The label of a sample from its ``label_key`` (``manifest.check_label_key``): an integer,
    or a class name looked up in ``names`` (the manifest's classes), as people store labels in
    ``.txt`` or ``.json`` (``json:meta.label``: a field inside a field)."""
    member, _, field = label_key.partition(":")
    if member not in parts:
        hint = "" if label_key != "cls" or "json" not in parts else " (its label may be in its .json: --label-key json:FIELD)"
        raise ShardError(f"{shard}: sample {key!r} has no '{member}' label member{hint}")
    text = parts[member].decode("utf-8", "replace").strip()
    if field:
        try:
            value = json.loads(text)
        except ValueError:
            raise ShardError(f"{shard}: sample {key!r}: its .json is not valid JSON") from None
        for part in field.split("."):
            if not isinstance(value, dict) or part not in value:
                raise ShardError(f"{shard}: sample {key!r}: its .json has no field {field!r}")
            value = value[part]
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if not isinstance(value, str):
            raise ShardError(f"{shard}: sample {key!r} has a label {str(value)[:20]!r} in its .json that is "
                             "neither an integer nor a class name")
        text = value.strip()
    try:
        return int(text)
    except ValueError:
        pass
    if names is None:
        raise ShardError(f"{shard}: sample {key!r} has the label {text[:40]!r}, not an integer; give the class "
                         "names (--classes FILE, one per line) to read names as labels")
    if text not in names:
        raise ShardError(f"{shard}: sample {key!r} has the label {text[:40]!r}, which is not one of the "
                         f"{len(names):,} class names")
    return names[text]


def unpacked(data: bytes, shard: str) -> bytes:
    """A shard's tar bytes: gzip'd shards (``.tar.gz``, as WebDataset's ``TarWriter`` writes a
    name ending in .gz) decompressed; more than 32x their size plus 1 GiB is refused (a
    decompression bomb, not a shard of images)."""
    if data[:2] != b"\x1f\x8b":
        return data
    limit = 32 * len(data) + (1 << 30)
    inflate = zlib.decompressobj(wbits=31)
    try:
        out = inflate.decompress(data, limit + 1)
    except zlib.error as e:
        raise ShardError(f"{shard}: gzip'd shard does not decompress ({e})") from None
    if len(out) > limit:
        raise ShardError(f"{shard}: decompresses to more than {limit:,} bytes")
    if not inflate.eof:
        raise ShardError(f"{shard}: truncated gzip stream")
    return out


def iter_tar_samples(fileobj: BinaryIO, shard: str, num_classes: int = MAX_CLASSES,
                     label_key: str = "cls", classes: Sequence[str] | None = None) -> Iterator[Sample]:
    """Yield the samples of an open tar stream in stored order (see the module docstring);
    a label outside ``0..num_classes - 1`` is refused naming the shard and key; a label that
    is a name is looked up in ``classes``."""
    names = {name: i for i, name in enumerate(classes)} if classes is not None else None
    key: str | None = None
    parts: dict[str, bytes] = {}
    seen: set[str] = set()
    size = fileobj.seek(0, io.SEEK_END)
    fileobj.seek(0)
    try:
        with tarfile.open(fileobj=fileobj, mode="r:") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                split = split_member_name(member.name)
                if split is None:
                    continue
                mkey, ext = split
                if mkey != key:
                    if key is not None:
                        yield _finish_sample(shard, key, parts, num_classes, label_key, names)
                    if mkey in seen:
                        raise ShardError(f"{shard}: key {mkey!r} appears twice (members not grouped)")
                    seen.add(mkey)
                    key, parts = mkey, {}
                if ext in parts or (ext in IMAGE_EXTS and any(e in parts for e in IMAGE_EXTS)):
                    raise ShardError(f"{shard}: sample {mkey!r} has a second image or '{ext}' member "
                                     f"({member.name!r}); which one is the sample is ambiguous")
                if member.offset_data + member.size > size:  # never read past the file's end
                    raise ShardError(f"{shard}: member {member.name!r} declares {member.size:,} "
                                     f"bytes, more than the file holds after it (truncated or "
                                     "corrupt tar)")
                data = tf.extractfile(member)
                assert data is not None
                parts[ext] = data.read()
                if len(parts[ext]) != member.size:
                    raise ShardError(f"{shard}: member {member.name!r} is truncated")
            end = tf.offset
    except tarfile.TarError as e:
        raise ShardError(f"{shard}: truncated or corrupt tar ({e})") from None
    if key is not None:
        yield _finish_sample(shard, key, parts, num_classes, label_key, names)
    # tarfile stops silently when a file ends exactly between members; a complete archive
    # always ends in two zero blocks, so their absence means the shard was cut short.
    fileobj.seek(end)
    tail = fileobj.read(_TAR_END)
    if len(tail) < _TAR_END or tail.count(0) != _TAR_END:
        raise ShardError(f"{shard}: truncated tar (no end-of-archive marker after offset {end})")


def iter_shard_file(path: str | Path, num_classes: int = MAX_CLASSES) -> Iterator[Sample]:
    """Stream the samples of a shard file without loading it whole."""
    with open(path, "rb") as f:
        yield from iter_tar_samples(f, str(path), num_classes)


def read_shard_bytes(path: Path | str, limit: int) -> bytes:
    """Up to ``limit`` bytes of a shard file, or of a URL's object (``remote``), in one read."""
    if isinstance(path, str) and remote_scheme(path):
        return read_remote(path, limit)
    try:
        return read_local(path, limit)
    except OSError as e:
        raise ManifestError(f"{path}: cannot read shard ({e.strerror or e})") from None


def read_shard(manifest: DataManifest, shard: int, verify: bool = True) -> list[Sample]:
    """Load one shard of a manifest into memory, checking size and sha256 on the same read.

    Stage one and stage two call this once per unit of work, so the checksum costs no extra I/O.
    """
    path = manifest.check_shard_file(shard)
    info = manifest.shards[shard]
    data = read_shard_bytes(path, info.bytes + 1)  # never past the listed size (+1 to see growth)
    if len(data) != info.bytes and isinstance(path, str):  # a URL: say the object's own size
        raise ManifestError(f"{path}: size {remote_size(path)} differs from manifest ({info.bytes} bytes)")
    if len(data) != info.bytes:
        raise ManifestError(f"{path}: read {len(data)} bytes, manifest lists {info.bytes}; the "
                            "shard changed while it was read")
    if verify:
        if sha256_bytes(data) != info.sha256:
            raise ManifestError(f"{path}: sha256 differs from manifest {manifest.location}; "
                                "the shard changed since the manifest was written")
    tar = unpacked(data, str(path))
    samples = list(iter_tar_samples(io.BytesIO(tar), str(path), manifest.num_classes, manifest.label_key,
                                    manifest.classes))
    if len(samples) != info.num_samples:
        raise ManifestError(f"{path}: holds {len(samples)} samples, manifest says {info.num_samples}")
    return samples
