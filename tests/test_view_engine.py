"""The batched view engine against its PIL/timm reference, op by op and for whole recipes; bytes
through the workers; CUDA where a GPU is present (issue: device view engine)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from civt_cache.bench.pil_reference import apply_records, decode_rgb, eval_view, render_base
from civt_cache.bench.probes import PeakMemory
from civt_cache.cache.create import create_or_open
from civt_cache.cache.spec import CacheSpec
from civt_cache.data.synthetic import photo_like_jpeg, write_imagenet_like
from civt_cache.errors import BadImageError
from civt_cache.loader.units import UnitReader
from civt_cache.views import records as V
from civt_cache.views.engine import decode_images, eval_views, render_views, worker_image
from civt_cache.views.ops import erase_noise
from civt_cache.views.recipe import Recipe

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
RECIPE = Recipe(img_size=224)
GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    rng = np.random.default_rng(0)
    return [photo_like_jpeg(rng) for _ in range(6)]


def levels(views: torch.Tensor, recipe: Recipe = RECIPE) -> torch.Tensor:
    """Normalised views back to the 0..255 scale, on the CPU."""
    mean = torch.tensor(recipe.mean).view(1, 3, 1, 1)
    std = torch.tensor(recipe.std).view(1, 3, 1, 1)
    return (views.cpu() * std + mean) * 255.0


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) ** 2).mean())
    return 10 * np.log10(255.0 ** 2 / max(mse, 1e-12))


def one_op_record(size: tuple[int, int], op: int | None, magnitude: int) -> np.ndarray:
    """A record that crops (an off-centre box), applies one RandAugment op and nothing else."""
    rec = np.zeros(V.NUM_FIELDS, np.int32)
    w, h = size
    rec[V.CROP] = (w // 9, h // 7, w // 2 + 40, h // 2 + 30)
    ra = rec[V.RA].reshape(-1, 2)
    ra[:, 0] = -1
    if op is not None:
        ra[0] = (op, magnitude)
    rec[V.RA] = ra.reshape(-1)
    rec[V.LAM] = V.LAM_ONE
    return rec


def engine_views(jpegs: list[bytes], recs: np.ndarray, device: str, recipe: Recipe = RECIPE,
                 rows: list[int] | None = None, outputs=None) -> torch.Tensor:
    images = decode_images([worker_image(j, f"img{i}") for i, j in enumerate(jpegs)], torch.device(device))
    return render_views(images, recs, rows if rows is not None else list(range(len(jpegs))), recipe, outputs)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_equals_pil(jpegs, device) -> None:
    for j, img in zip(jpegs, decode_images(jpegs, torch.device(device))):
        ref = torch.from_numpy(np.array(decode_rgb(j))).permute(2, 0, 1)
        diff = (img.cpu().int() - ref.int()).abs().float().mean()
        assert diff <= (0 if device == "cpu" else 2), diff  # libjpeg-turbo on both sides on CPU


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", [None, *range(len(V.RA_OPS))],
                         ids=["crop-resize", *V.RA_OPS])
def test_each_op_matches_pil(jpegs, op, device) -> None:
    """Each op against timm's PIL op on the same parameters: mean absolute error <= 2 levels,
    and PSNR >= 35 dB for the resampling ones; the geometric ops within 0.1 level, unbiased."""
    pil = [decode_rgb(j) for j in jpegs[:4]]
    for magnitude in (900, -900, 500, 1000):
        recs = np.stack([one_op_record(im.size, op, magnitude) for im in pil])
        for i in range(len(recs)):
            recs[i, V.PARTNER] = i
        got = levels(engine_views(jpegs[:4], recs, device))
        ref = levels(torch.stack([render_base(im, r, RECIPE) for im, r in zip(pil, recs)]))
        mae = float((got - ref).abs().mean())
        assert mae <= 2.0, (magnitude, mae)
        if op is None or V.RA_OPS[op] in GEOMETRIC:
            assert psnr(got, ref) >= 35.0, (magnitude, psnr(got, ref))
        if op is not None and V.RA_OPS[op] in GEOMETRIC:  # Pillow's affine: its kernel, its truncation
            bias = float((got - ref).mean())
            assert mae < 0.1 and abs(bias) < 0.02, (magnitude, mae, bias)


def recipe_records(jpegs: list[bytes], recipe: Recipe, epoch: int = 0) -> np.ndarray:
    sizes = [V.image_size(j) for j in jpegs]
    return V.sample_shard_records(recipe, 11, epoch, 0, list(range(len(jpegs))), sizes)


@pytest.mark.parametrize("device", DEVICES)
def test_whole_recipe_matches_pil_path(jpegs, device) -> None:
    """Co-advise's full recipe (RandAugment, erasing, Mixup/CutMix), every view against the
    PIL path's on the same records, and the batch's statistics."""
    got_all, ref_all = [], []
    for epoch in range(3):
        recs = recipe_records(jpegs, RECIPE, epoch)
        got = engine_views(jpegs, recs, device)
        images = {r: decode_rgb(j) for r, j in enumerate(jpegs)}
        ref = apply_records(images, dict(enumerate(recs)), list(range(len(jpegs))), RECIPE)
        got_all.append(got.cpu())
        ref_all.append(ref)
        assert float((levels(got) - levels(ref)).abs().mean()) <= 2.0
    g, r = torch.cat(got_all), torch.cat(ref_all)
    assert torch.allclose(g.mean((0, 2, 3)), r.mean((0, 2, 3)), atol=0.01)
    assert torch.allclose(g.std((0, 2, 3)), r.std((0, 2, 3)), rtol=0.01)


@pytest.mark.parametrize("device", DEVICES)
def test_views_do_not_depend_on_the_batch(jpegs, device) -> None:
    """The same record gives the same view whatever else is in the batch and in what order."""
    recs = recipe_records(jpegs, RECIPE)
    full = engine_views(jpegs, recs, device)
    order = [5, 2, 0, 4, 1, 3]
    shuffled = engine_views([jpegs[i] for i in order], recs[order], device, rows=order)
    assert torch.equal(shuffled, full[order])
    for row in range(len(jpegs)):
        partner = int(recs[row, V.PARTNER])
        pair = [row] if partner == row else [row, partner]
        alone = engine_views([jpegs[i] for i in pair], recs[pair], device, rows=pair, outputs=[0])
        assert torch.equal(alone[0], full[row])


def test_a_partner_outside_the_batch_is_refused(jpegs) -> None:
    recs = recipe_records(jpegs, Recipe(img_size=64, mix_prob=1.0))
    row = next(i for i in range(len(recs)) if recs[i, V.PARTNER] != i)
    with pytest.raises(ValueError, match="mixing partner .* is not in the batch"):
        engine_views([jpegs[row]], recs[[row]], "cpu", Recipe(img_size=64), rows=[row])


def test_stored_op_table_is_timms_increasing_set() -> None:
    """The op table that gives stored indices their meaning is written out in civt-cache; it
    must stay timm's ``inc1`` order. A timm that reorders its list fails here, not silently in
    every cache (the records version then needs a bump, see ``views.RA_OPS``)."""
    from timm.data import auto_augment as taa

    assert V.RA_OPS == tuple(taa._RAND_INCREASING_TRANSFORMS)


def test_erase_noise_is_keyed_and_standard_normal() -> None:
    box = (10, 20, 100, 80)
    a = erase_noise(123, box, 224, torch.device("cpu"))
    assert a.shape == (3, 80, 100)
    assert torch.equal(a, erase_noise(123, box, 224, torch.device("cpu")))
    inner = erase_noise(123, (30, 40, 10, 10), 224, torch.device("cpu"))
    assert torch.equal(inner, a[:, 20:30, 20:30])  # a pixel's noise does not depend on the box
    assert not torch.equal(a, erase_noise(124, box, 224, torch.device("cpu")))
    big = erase_noise(7, (0, 0, 224, 224), 224, torch.device("cpu"))
    assert abs(float(big.mean())) < 0.01 and abs(float(big.std()) - 1) < 0.01
    if torch.cuda.is_available():
        torch.testing.assert_close(erase_noise(123, box, 224, torch.device("cuda")).cpu(), a,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_eval_views_match_pil(jpegs, device) -> None:
    got = eval_views(decode_images(jpegs, torch.device(device)), RECIPE)
    ref = torch.stack([eval_view(j, RECIPE) for j in jpegs])
    assert float((levels(got) - levels(ref)).abs().mean()) <= 1.0


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_images_that_are_not_colour_jpegs_are_decoded_in_the_worker(jpegs) -> None:
    rgb = decode_rgb(jpegs[0])
    cases = {"png": _encode(rgb, "PNG"), "gray-jpeg": _encode(rgb.convert("L"), "JPEG"),
             "cmyk-jpeg": _encode(rgb.convert("CMYK"), "JPEG"), "webp": _encode(rgb, "WEBP")}
    for name, data in cases.items():
        item = worker_image(data, name)
        assert isinstance(item, torch.Tensor) and item.dtype == torch.uint8, name
        ref = torch.from_numpy(np.array(decode_rgb(data))).permute(2, 0, 1)
        assert torch.equal(decode_images([item], torch.device("cpu"))[0], ref), name
    assert worker_image(jpegs[0], "jpeg") is jpegs[0]  # colour JPEGs travel as bytes


def test_bad_images_are_named() -> None:
    with pytest.raises(BadImageError, match="shard-7.tar: sample 'k1': image does not decode"):
        worker_image(b"not an image at all", "shard-7.tar: sample 'k1'")
    good = _encode(Image.new("RGB", (64, 48), (200, 10, 10)), "JPEG")
    cut = good[:200] + bytes(len(good) - 200)  # header intact, entropy-coded data zeroed
    with pytest.raises(BadImageError, match="s.tar: sample 'b'"):
        decode_images([good, cut], torch.device("cpu"), ["s.tar: sample 'a'", "s.tar: sample 'b'"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_views_within_tolerance_of_cpu(jpegs) -> None:
    recs = recipe_records(jpegs, RECIPE)
    cpu, cuda = levels(engine_views(jpegs, recs, "cpu")), levels(engine_views(jpegs, recs, "cuda"))
    assert float((cpu - cuda).abs().mean()) <= 2.0 and psnr(cpu, cuda) >= 35.0


def test_workers_move_bytes_and_shared_memory_stays_flat(tmp_path: Path) -> None:
    """Stage one's loader hands over encoded bytes (no pixel tensors); its /dev/shm peak with 2
    workers at 224 px stays under 64 MB and does not grow when the shard size doubles."""
    peaks = {}
    for n in (48, 96):
        m = write_imagenet_like(tmp_path / f"d{n}", n, seed=n)
        units = [(0, 0)]
        ds = UnitReader(m, tmp_path / "no-cache", units, {}, [], CacheSpec.for_manifest(m, RECIPE, 0, 1, 1, 5))
        with PeakMemory(interval=0.02) as mem:
            items = list(DataLoader(ds, batch_size=None, num_workers=2))
        assert all(isinstance(im, bytes) for it in items for im in it.images)
        assert sum(len(it.rows) for it in items) == n
        peaks[n] = mem.shm
    assert max(peaks.values()) < 64 * 2**20, peaks
    assert peaks[96] <= peaks[48] + 8 * 2**20, peaks


def test_a_cache_of_another_views_version_is_refused(tmp_path: Path) -> None:
    """A record means what the engine renders of it: a cache made by another views version
    would be replayed as other pixels, so it is refused with the reason."""
    import json

    from civt_cache.cache.store import CacheStore
    from civt_cache.errors import CacheMismatchError

    m = write_imagenet_like(tmp_path / "d", 4)
    spec = CacheSpec.for_manifest(m, Recipe(img_size=32), 0, 1, 1, 5)
    create_or_open(tmp_path / "c", spec)
    meta = json.loads((tmp_path / "c" / "zarr.json").read_text())
    meta["attributes"]["views_version"] = 1
    (tmp_path / "c" / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(CacheMismatchError, match="views version 1.*cannot be replayed"):
        CacheStore.open(tmp_path / "c")
