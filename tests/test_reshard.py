"""make-shards at any size: a manifest's shards rewritten shuffled, and an image folder written,
in memory bounded by --max-memory-mb, measured on data ten times the bound (peak RSS of the
command and of its encoding processes, against the same command on a tenth of the data)."""
from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from civt_cache.bench.scale import measured
from civt_cache.data.manifest import load_manifest
from civt_cache.data.shards import read_shard
from .conftest import run_cli

BOUND_MB = 12

def _noise_jpegs(count: int, seed: int) -> list[bytes]:
    """Incompressible JPEGs of about 120 KB: the data's bytes are what memory would hold."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (320, 320, 3), np.uint8)).save(buf, format="JPEG", quality=95)
        out.append(buf.getvalue())
    return out


def _write_tars(folder: Path, prefix: str, samples: list[tuple[str, int, bytes]], per_shard: int) -> None:
    """(key, label, jpeg) samples in this order as tar shards of ``per_shard`` (KEY.jpg + KEY.cls)."""
    folder.mkdir(parents=True)
    for s in range(0, len(samples), per_shard):
        with tarfile.open(folder / f"{prefix}-{s // per_shard:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, label, data in samples[s:s + per_shard]:
                for ext, payload in (("jpg", data), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


def _sorted_shards(folder: Path, images: list[bytes], classes: int, per_shard: int) -> list[tuple[str, int]]:
    """Shards written class by class (as many tools write them); returns (key, label) of each."""
    samples = [(f"k{i:05d}", i * classes // len(images)) for i in range(len(images))]
    _write_tars(folder, "sorted", [(k, label, data) for (k, label), data in zip(samples, images)], per_shard)
    return samples


def _peak_rss_mb(*args: str) -> float:
    """The command's own peak RSS plus its largest child's (an encoding process)."""
    m = measured(list(args), Path.cwd())
    return m.rss_mib + m.child_mib


def _resharded(tmp_path: Path, name: str, count: int) -> tuple[float, list[tuple[str, int]], Path]:
    images = _noise_jpegs(count, seed=count)
    samples = _sorted_shards(tmp_path / f"{name}-in", images, 10, 40)  # ~5 MB a shard, under half the bound
    run_cli("scan-shards", str(tmp_path / f"{name}-in"), "--name", name, "--manifest", str(tmp_path / f"{name}.json"))
    rss = _peak_rss_mb("make-shards", str(tmp_path / f"{name}.json"), str(tmp_path / f"{name}-out"),
                       "--name", f"{name}-r", "--shard-size", "50", "--workers", "2",
                       "--max-memory-mb", str(BOUND_MB), "--manifest", str(tmp_path / f"{name}-r.json"))
    return rss, samples, tmp_path / f"{name}-r.json"


def test_resharding_ten_times_the_bound_holds_the_bound_and_every_sample(tmp_path) -> None:
    small_rss, _, _ = _resharded(tmp_path, "small", 110)
    big_rss, samples, out = _resharded(tmp_path, "big", 1100)
    m = load_manifest(out)
    data_mb = sum(s.bytes for s in m.shards) / 2**20
    assert data_mb > 10 * BOUND_MB
    assert big_rss - small_rss < BOUND_MB, (small_rss, big_rss, data_mb)
    got = [(s.key, s.label) for i in range(len(m.shards)) for s in read_shard(m, i)]
    assert sorted(got) == sorted(samples)  # every sample once, with its label
    assert m.label_spread is not None and m.label_spread.sorted_message([s.path for s in m.shards],
                                                                          [s.num_samples for s in m.shards]) is None
    positions = {key: i for i, (key, _) in enumerate(got)}
    firsts = [positions[f"k{i:05d}"] for i in range(0, 1100, 110)]  # each class's first sample, spread out
    assert max(firsts) - min(firsts) > 500
    assert not list(tmp_path.glob("big-out/.civt-spool-*"))  # the spool is gone


def test_an_image_folder_ten_times_the_bound_holds_the_bound(tmp_path) -> None:
    def folder(name: str, count: int) -> Path:
        root = tmp_path / name
        for i, data in enumerate(_noise_jpegs(count, seed=count)):
            (root / f"c{i % 5}").mkdir(parents=True, exist_ok=True)
            (root / f"c{i % 5}" / f"{i:05d}.jpg").write_bytes(data)
        return root

    rss = {}
    for name, count in (("small", 110), ("big", 1100)):
        rss[name] = _peak_rss_mb("make-shards", str(folder(name, count)), str(tmp_path / f"{name}-out"), "--name",
                                 name, "--shard-size", "100", "--workers", "2", "--max-memory-mb", str(BOUND_MB),
                                 "--manifest", str(tmp_path / f"{name}.json"))
    m = load_manifest(tmp_path / "big.json")
    assert m.num_samples == 1100 and sum(s.bytes for s in m.shards) / 2**20 > 10 * BOUND_MB
    assert rss["big"] - rss["small"] < BOUND_MB, rss


def test_resharding_refuses_a_bound_under_a_shard_naming_it(tmp_path) -> None:
    _sorted_shards(tmp_path / "in", _noise_jpegs(40, seed=1), 4, 40)
    run_cli("scan-shards", str(tmp_path / "in"), "--name", "s", "--manifest", str(tmp_path / "s.json"))
    proc = run_cli("make-shards", str(tmp_path / "s.json"), str(tmp_path / "out"), "--name", "r",
                   "--max-memory-mb", "4", "--manifest", str(tmp_path / "r.json"), check=False)
    assert proc.returncode != 0 and "--max-memory-mb 4" in proc.stderr and "sorted-000000.tar" in proc.stderr
    assert "raise it" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r.json").exists() and not list((tmp_path / "out").glob("*.tar"))


@pytest.mark.parametrize("stage", ["cache-teachers", "train-student"])
def test_both_stages_refuse_class_sorted_shards_naming_the_fix_and_the_flag(world, tmp_path, stage) -> None:
    """The digits written class by class: refused before anything is made, naming make-shards
    and --allow-sorted-shards; with the flag, the stage runs and says it was asked to."""
    from .conftest import cache_args, student_args

    src = load_manifest(world["manifest"])
    samples = sorted((s for i in range(len(src.shards)) for s in read_shard(src, i)), key=lambda s: s.label)
    _write_tars(tmp_path / "in", "c", [(s.key, s.label, s.image) for s in samples], 36)
    scanned = run_cli("scan-shards", str(tmp_path / "in"), "--name", "c", "--manifest", str(tmp_path / "c.json"))
    assert "look sorted by class" in scanned.stderr
    raw = json.loads((tmp_path / "c.json").read_text())
    assert Counter(h for h, _ in raw["label_spread"]["shards"]).most_common(1)[0][0] <= 2
    out = tmp_path / "made"
    args = (cache_args(world["root"], out, "--epochs", "1") if stage == "cache-teachers"
            else student_args(world, world["ref"], out, "--epochs", "1", "--max-steps", "1"))
    args[args.index("--manifest") + 1] = str(tmp_path / "c.json")
    proc = run_cli(*args, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "shards look sorted by class" in proc.stderr and "c-000000.tar" in proc.stderr
    assert "make-shards MANIFEST OUT_DIR" in proc.stderr and "--allow-sorted-shards" in proc.stderr
    assert not out.exists()  # nothing made, nothing pinned
    if stage == "cache-teachers":
        done = run_cli(*args, "--allow-sorted-shards")
        assert "warning: --allow-sorted-shards" in done.stderr and (out / "zarr.json").exists()
