"""Shards as WebDataset users have them, written by the webdataset library itself: labels in a
Hugging Face-style .json field or a .txt, gzip'd tars, pipe: and file:// URLs, through
scan-shards, cache-teachers and train-student."""
from __future__ import annotations

import json
import os

import pytest
import webdataset as wds

from civt_cache.data.manifest import load_manifest
from civt_cache.data.shards import read_shard

from .conftest import refused, run_cli

PIPE = {**os.environ, "CIVT_ALLOW_PIPE": "1"}


@pytest.fixture(scope="module")
def wds_shards(world, tmp_path_factory):
    """The digits of conftest's world rewritten by ``webdataset.ShardWriter`` (uneven shards
    of 150), each label in its .json, as the Hugging Face datasets export writes them."""
    source = load_manifest(world["manifest"])
    samples = [s for i in range(len(source.shards)) for s in read_shard(source, i)]
    folder = tmp_path_factory.mktemp("wds")
    with wds.ShardWriter(str(folder / "hf-%06d.tar"), maxcount=150, verbose=0) as sink:
        for s in samples:
            sink.write({"__key__": s.key, "png": s.image, "json": json.dumps({"label": s.label, "source": "digits"})})
    return folder, samples, source


def test_shardwriter_json_labels_through_a_pipe_url_run_both_stages(world, wds_shards, tmp_path) -> None:
    folder, samples, source = wds_shards
    shards = sorted(folder.glob("hf-*.tar"))
    assert len(shards) == 3
    url = f"pipe:cat {folder}/hf-{{000000..{len(shards) - 1:06d}}}.tar"
    manifest = tmp_path / "hf.json"
    refused(run_cli("scan-shards", url, "--name", "hf", "--manifest", str(manifest), "--label-key", "json:label",
                    "--classes", str(_classes(tmp_path, source)), check=False), "CIVT_ALLOW_PIPE=1")
    run_cli("scan-shards", url, "--name", "hf", "--manifest", str(manifest), "--label-key", "json:label",
            "--classes", str(_classes(tmp_path, source)), env=PIPE)
    m = load_manifest(manifest)
    assert m.label_key == "json:label" and m.shards[0].path.startswith("pipe:cat ")
    got = [s for i in range(len(m.shards)) for s in read_shard(m, i)] if os.environ.get("CIVT_ALLOW_PIPE") else None
    cache = tmp_path / "cache"
    run_cli("cache-teachers", "--manifest", str(manifest), "--teacher", f"conv=resnet10t:{world['root'] / 'conv.pth'}",
            "--img-size", "32", "--epochs", "1", "--topk", "5", "--out", str(cache), "--workers", "2",
            "--batch-size", "64", env=PIPE)
    run = tmp_path / "run"
    run_cli("train-student", "--manifest", str(manifest), "--val-manifest", str(manifest), "--cache", str(cache),
            "--teachers", "conv", "--model", "civt_micro", "--img-size", "32", "--epochs", "1", "-b", "32", "-j", "2",
            "--device", "cpu", "--max-steps", "3", "--out", str(run), env=PIPE)
    assert (run / "last.pth.tar").exists()
    assert got is None or [(s.key, s.label) for s in got] == [(s.key, s.label) for s in samples]


def test_txt_labels_and_gzipd_shards_read_as_the_library_wrote_them(wds_shards, tmp_path) -> None:
    _, samples, source = wds_shards
    with wds.TarWriter(str(tmp_path / "t-000000.tar.gz")) as sink:  # a .gz name: gzip'd
        for s in samples[:50]:
            sink.write({"__key__": s.key, "png": s.image, "txt": str(s.label)})
    manifest = tmp_path / "t.json"
    run_cli("scan-shards", f"file://{tmp_path}/t-000000.tar.gz", "--name", "t", "--manifest", str(manifest),
            "--label-key", "txt", "--classes", str(_classes(tmp_path, source)))
    m = load_manifest(manifest)
    assert [(s.key, s.image, s.label) for s in read_shard(m, 0)] == [(s.key, s.image, s.label) for s in samples[:50]]


def test_a_json_label_without_its_key_names_the_way_to_read_it(wds_shards, tmp_path) -> None:
    folder, _, _ = wds_shards
    proc = run_cli("scan-shards", str(folder / "hf-000000.tar"), "--name", "hf", "--manifest",
                   str(tmp_path / "m.json"), check=False)
    refused(proc, "no 'cls' label member", "--label-key json:FIELD")


def _classes(tmp_path, source) -> object:
    path = tmp_path / "classes.txt"
    path.write_text("\n".join(source.classes) + "\n")
    return path


def test_make_shards_output_reads_with_timms_wds_reader(digits) -> None:
    """timm's own WebDataset reader (``create_dataset("wds/...")``) reads make-shards' shards:
    the same keys' labels, images that decode."""
    from timm.data import create_dataset

    m = load_manifest(digits["val"])
    folder = m.shard_path(0).parent
    split = f"digits-val-{{000000..{len(m.shards) - 1:06d}}}.tar|{m.num_samples}"
    dataset = create_dataset("wds/digits", root=str(folder), split=split, is_training=False, batch_size=1)
    got = [(image.size, int(target)) for image, target in dataset]
    ours = [s.label for i in range(len(m.shards)) for s in read_shard(m, i)]
    assert [t for _, t in got] == ours and all(size == (32, 32) for size, _ in got)
