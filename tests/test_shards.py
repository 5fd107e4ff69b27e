"""make-shards / scan-shards / the reading API (issue: foundation)."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from civt_cache import ManifestError, ShardError, iter_shard_file, load_manifest, read_shard
from civt_cache.data.scan import scan_shards
from civt_cache.data.writer import image_folder_items, write_shards
from civt_cache.fsutil import sha256_file

from .conftest import run_cli


def _save(path: Path, im: Image.Image, fmt: str, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format=fmt, **kw)


@pytest.fixture()
def messy_folder(tmp_path: Path) -> Path:
    """An ImageFolder with every awkward case the issue lists."""
    rng = np.random.default_rng(0)
    root = tmp_path / "src"
    rgb = lambda w, h: Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB")
    _save(root / "cat" / "a.jpg", rgb(40, 30), "JPEG")
    _save(root / "cat" / "b.JPEG", rgb(1, 1), "JPEG")
    _save(root / "cat" / "gray.jpg", rgb(20, 20).convert("L"), "JPEG")
    _save(root / "cat" / "cmyk.jpg", rgb(16, 24).convert("CMYK"), "JPEG")
    _save(root / "dog" / "rgba.png", rgb(10, 12).convert("RGBA"), "PNG")
    _save(root / "dog" / "pal.PNG", rgb(9, 9).convert("P"), "PNG")
    _save(root / "dog" / "x.webp", rgb(17, 5), "WEBP")
    _save(root / "dog" / "sub" / "deep.jpeg", rgb(300, 200), "JPEG")
    _save(root / "eel" / "big.png", rgb(512, 64), "PNG")
    (root / "eel" / ".hidden").write_text("ignored")
    return root


def test_messy_folder_makes_readable_shards(messy_folder: Path, tmp_path: Path) -> None:
    manifest_path = tmp_path / "m" / "messy.json"
    run_cli("make-shards", str(messy_folder), str(tmp_path / "out"), "--name", "messy",
            "--shard-size", "4", "--manifest", str(manifest_path), "--seed", "3")
    m = load_manifest(manifest_path)
    assert m.classes == ["cat", "dog", "eel"]
    assert m.num_samples == 9 and [s.num_samples for s in m.shards] == [4, 4, 1]
    assert m.encoding == {"jpeg_as_is": 3, "reencoded_jpeg_q95": 6}
    labels_per_shard = []
    for i, info in enumerate(m.shards):
        assert sha256_file(m.shard_path(i)) == info.sha256
        assert m.shard_path(i).stat().st_size == info.bytes
        samples = read_shard(m, i)
        labels_per_shard.append({s.label for s in samples})
        for s in samples:  # every stored image decodes as RGB
            assert Image.open(io.BytesIO(s.image)).convert("RGB").size[0] >= 1
        with tarfile.open(m.shard_path(i)) as tf:  # plain tarfile reads it
            names = tf.getnames()
        assert len(names) == 2 * info.num_samples
        wds_samples = list(wds.WebDataset(str(m.shard_path(i)), shardshuffle=False))
        assert [w["__key__"] for w in wds_samples] == [s.key for s in samples]
        assert [int(w["cls"]) for w in wds_samples] == [s.label for s in samples]
    assert any(len(labels) > 1 for labels in labels_per_shard)  # shards mix classes


def test_keys_unique_and_stable(messy_folder: Path, tmp_path: Path) -> None:
    _, items = image_folder_items(messy_folder)
    keys = [it.key for it in items]
    assert len(set(keys)) == len(keys) and all("." not in k for k in keys)
    _, again = image_folder_items(messy_folder)
    assert [it.key for it in again] == keys
    a = write_shards(items, ["cat", "dog", "eel"], tmp_path / "a", "x", 5, 1, "t", tmp_path / "a.json")
    b = write_shards(again, ["cat", "dog", "eel"], tmp_path / "b", "x", 5, 1, "t", tmp_path / "b.json")
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]  # byte-identical rebuild


@pytest.mark.parametrize("bad", [b"", b"not an image at all", "truncated"])
def test_bad_image_refused_then_skipped(messy_folder: Path, tmp_path: Path, bad) -> None:
    if bad == "truncated":
        full = (messy_folder / "dog" / "sub" / "deep.jpeg").read_bytes()
        bad = full[: len(full) // 2]
    bad_file = messy_folder / "eel" / "broken.jpg"
    bad_file.write_bytes(bad)
    manifest_path = tmp_path / "bad.json"
    proc = run_cli("make-shards", str(messy_folder), str(tmp_path / "out"), "--name", "bad",
                   "--shard-size", "3", "--manifest", str(manifest_path), check=False)
    assert proc.returncode == 2
    assert "broken.jpg" in proc.stderr and "Traceback" not in proc.stderr
    assert not manifest_path.exists()
    assert not list((tmp_path / "out").glob("*.tar"))  # no shard claims completeness
    run_cli("make-shards", str(messy_folder), str(tmp_path / "out"), "--name", "bad",
            "--shard-size", "3", "--manifest", str(manifest_path), "--skip-bad")
    m = load_manifest(manifest_path)
    assert m.num_samples == 9
    assert len(m.skipped) == 1 and m.skipped[0]["file"].endswith("broken.jpg") and m.skipped[0]["reason"]


def test_failed_rebuild_keeps_previous_dataset(messy_folder: Path, tmp_path: Path) -> None:
    manifest_path = tmp_path / "keep.json"
    run_cli("make-shards", str(messy_folder), str(tmp_path / "out"), "--name", "keep",
            "--shard-size", "3", "--manifest", str(manifest_path))
    before = manifest_path.read_bytes()
    (messy_folder / "cat" / "zz.jpg").write_bytes(b"garbage")
    proc = run_cli("make-shards", str(messy_folder), str(tmp_path / "out"), "--name", "keep",
                   "--shard-size", "3", "--manifest", str(manifest_path), "--seed", "9", check=False)
    assert proc.returncode == 2
    assert manifest_path.read_bytes() == before
    m = load_manifest(manifest_path)
    for i in range(len(m.shards)):
        read_shard(m, i)  # size and sha256 as listed


def test_digits_manifests(digits) -> None:
    train, val = load_manifest(digits["train"]), load_manifest(digits["val"])
    assert train.num_samples + val.num_samples == 1797
    assert train.classes == [str(i) for i in range(10)]
    assert train.row_stride == 256 and train.shard_base(2) == 512
    assert train.locate(train.row_of(3, 7)) == (3, 7)
    with pytest.raises(IndexError):
        train.locate(train.shard_base(5) + train.shards[5].num_samples)  # padding row
    s = read_shard(train, 0)[0]
    assert Image.open(io.BytesIO(s.image)).size == (32, 32)


def test_digit_pairs_are_made_by_make_shards_from_disjoint_scans(tmp_path: Path) -> None:
    """The 100-class task: ``make-shards digit-pairs`` writes the very shards the committed
    manifests list (byte for byte), every class equally often, each pair's class its two
    digits, and no scan both in a training pair and in a held-out one."""
    from sklearn.datasets import load_digits

    root = Path(__file__).resolve().parents[1]
    run_cli("make-shards", "digit-pairs", str(tmp_path / "shards"), "--name", "digit-pairs", "--shard-size", "256",
            "--manifest", str(tmp_path / "dp.json"), cwd=tmp_path)
    target = load_digits().target
    scans = {}
    for split, per_class in (("train", 24), ("val", 10)):
        made, committed = (json.loads(p.read_text()) for p in (tmp_path / f"dp-{split}.json",
                                                                 root / "data_manifests" / f"digit-pairs-{split}.json"))
        assert [s["sha256"] for s in made["shards"]] == [s["sha256"] for s in committed["shards"]]
        m = load_manifest(tmp_path / f"dp-{split}.json")
        assert m.num_classes == 100 and m.num_samples == 100 * per_class
        labels, used = [], set()
        for shard in range(len(m.shards)):
            for sample in read_shard(m, shard):
                _, _, a, b = sample.key.split("-")
                assert (target[int(a)], target[int(b)]) == divmod(sample.label, 10), sample.key
                labels.append(sample.label)
                used |= {int(a), int(b)}
        assert np.bincount(labels).tolist() == [per_class] * 100
        scans[split] = used
    assert not scans["train"] & scans["val"]


def test_scan_shards_ours_and_tarwriter(digits, tmp_path: Path) -> None:
    ours = load_manifest(digits["val"])
    shard_dir = ours.shard_path(0).parent
    scanned = scan_shards(str(shard_dir / "digits-val-{000000..000001}.tar"), "v", tmp_path / "v.json")
    assert [s.sha256 for s in scanned.shards] == [s.sha256 for s in ours.shards]
    assert scanned.num_samples == ours.num_samples and scanned.num_classes == 10
    # shards written directly with webdataset's TarWriter, with png and webp members
    out = tmp_path / "wds"
    out.mkdir()
    for i in range(2):
        with wds.TarWriter(str(out / f"train-{i:06d}.tar")) as w:
            for j in range(5):
                im = Image.new("RGB", (8, 8), (j * 40, 0, 0))
                buf = io.BytesIO()
                ext = "png" if j % 2 else "webp"
                im.save(buf, format=ext.upper())
                w.write({"__key__": f"s{i}_{j}", ext: buf.getvalue(), "cls": str(j % 3)})
    proc = run_cli("scan-shards", str(out / "train-{000000..000001}.tar"), "--name", "w",
                   "--manifest", str(tmp_path / "w.json"))
    assert "10 samples" in proc.stdout
    m = load_manifest(tmp_path / "w.json")
    assert m.num_classes == 3
    assert [s.label for s in read_shard(m, 1)] == [0, 1, 2, 0, 1]


def test_truncated_tar_and_missing_label_refused(digits, tmp_path: Path) -> None:
    src = load_manifest(digits["val"]).shard_path(1).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(src)) as tf:
        cut_at_member = tf.getmembers()[10].offset  # exactly between two members
    for name, data in {"mid.tar": src[: len(src) // 2 + 100], "edge.tar": src[:cut_at_member]}.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ShardError, match=name):
            list(iter_shard_file(tmp_path / name))
        proc = run_cli("scan-shards", str(tmp_path / name), "--name", "t",
                       "--manifest", str(tmp_path / "t.json"), check=False)
        assert proc.returncode == 2 and name in proc.stderr and "truncated" in proc.stderr
    with wds.TarWriter(str(tmp_path / "nolabel.tar")) as w:
        w.write({"__key__": "ok", "jpg": b"x", "cls": "1"})
        w.write({"__key__": "lonely", "jpg": b"x"})
    with pytest.raises(ShardError, match="lonely.*'cls'"):
        list(iter_shard_file(tmp_path / "nolabel.tar"))


def test_changed_shard_checksum_refused(digits, tmp_path: Path) -> None:
    m = load_manifest(digits["val"])
    raw = json.loads(digits["val"].read_text())
    raw["shards"][0]["sha256"] = "0" * 64
    raw["shards"] = [dict(s, path=str(m.shard_path(i))) for i, s in enumerate(raw["shards"])]
    (tmp_path / "m.json").write_text(json.dumps(raw))
    bad = load_manifest(tmp_path / "m.json")
    with pytest.raises(ManifestError, match="digits-val-000000.tar.*sha256"):
        read_shard(bad, 0)


def test_scan_shards_warns_about_class_sorted_shards(tmp_path: Path) -> None:
    """Shards written class by class (as many tools do) get a warning with the label spread;
    shuffled ones do not."""
    def write(folder: Path, labels: list[int]) -> None:
        folder.mkdir()
        for i in range(0, len(labels), 20):
            with wds.TarWriter(str(folder / f"s-{i // 20:06d}.tar")) as w:
                for j, label in enumerate(labels[i:i + 20]):
                    buf = io.BytesIO()
                    Image.new("RGB", (8, 8), (label * 20, 0, 0)).save(buf, format="PNG")
                    w.write({"__key__": f"k{i + j}", "png": buf.getvalue(), "cls": str(label)})

    ordered = [c for c in range(10) for _ in range(10)]  # 100 samples, 10 per class, sorted
    write(tmp_path / "sorted", ordered)
    proc = run_cli("scan-shards", str(tmp_path / "sorted"), "--name", "s",
                   "--manifest", str(tmp_path / "s.json"))
    assert "5 of 5 shards look sorted by class" in proc.stderr
    assert "s-000000.tar: 20 samples, 2 classes (about 9 if shuffled), largest class 50%" in proc.stderr
    assert "make-shards MANIFEST OUT_DIR" in proc.stderr and load_manifest(tmp_path / "s.json").num_samples == 100
    # the advice works: make-shards rewrites the scanned shards shuffled, every sample kept
    run_cli("make-shards", str(tmp_path / "s.json"), str(tmp_path / "resharded"), "--name", "r",
            "--shard-size", "20", "--manifest", str(tmp_path / "r.json"))
    proc = run_cli("scan-shards", str(tmp_path / "resharded"), "--name", "r2", "--manifest", str(tmp_path / "r2.json"))
    assert "sorted by class" not in proc.stderr
    resharded = load_manifest(tmp_path / "r.json")
    got = sorted((s.key, s.label) for i in range(len(resharded.shards)) for s in read_shard(resharded, i))
    assert got == sorted((f"k{i}", label) for i, label in enumerate(ordered))
    shuffled = np.random.default_rng(0).permutation(ordered).tolist()
    write(tmp_path / "shuffled", shuffled)
    proc = run_cli("scan-shards", str(tmp_path / "shuffled"), "--name", "u",
                   "--manifest", str(tmp_path / "u.json"))
    assert "sorted by class" not in proc.stderr
