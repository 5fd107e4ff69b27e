"""The view engine as a GPU runs it (issue: views at the GPU's speed): Pillow-exact batched
resize, batched erasing equal to one box at a time, the CPU's chunked stream equal to the GPU's
whole-batch stream, and launches / transfers / device reads per batch that do not grow with it,
counted on the CPU."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from civt_cache.bench.op_counts import count_ops
from civt_cache.views import engine
from civt_cache.views import records as V
from civt_cache.views.engine import decode_images, eval_views, gpu_op_stream, render_encoded, worker_image
from civt_cache.views.ops import erase, erase_noise, erase_params, mix, mix_params
from civt_cache.views.recipe import Recipe
from civt_cache.views.resample import resample
from civt_cache.views.transfer import to_device

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _pillow_crop_resize(pixels: np.ndarray, box: tuple[int, int, int, int], out: tuple[int, int],
                        window: tuple[int, int], s: int) -> np.ndarray:
    x, y, w, h = box
    im = Image.fromarray(pixels).crop((x, y, x + w, y + h)).resize(out, Image.BICUBIC)
    return np.array(im.crop((window[0], window[1], window[0] + s, window[1] + s)))


def _cases(rng: np.random.Generator) -> list[tuple[np.ndarray, tuple, tuple, tuple]]:
    """ImageNet-shaped images with crops that upscale, downscale, both at once, at extreme
    aspect ratios, and the whole image resized then centre-cropped (evaluation)."""
    cases = []
    for w, h, box, out, window in [
        (500, 375, (0, 0, 500, 375), (224, 224), (0, 0)),      # downscale both ways
        (500, 375, (40, 30, 100, 90), (224, 224), (0, 0)),     # upscale both ways
        (480, 420, (10, 5, 60, 400), (224, 224), (0, 0)),      # up in x, down in y
        (480, 420, (3, 7, 470, 80), (224, 224), (0, 0)),       # down in x, up in y
        (640, 480, (100, 0, 1, 480), (224, 224), (0, 0)),      # one pixel wide
        (640, 480, (0, 200, 640, 2), (224, 224), (0, 0)),      # two pixels high
        (333, 500, (0, 0, 333, 500), (256, 384), (16, 80)),    # eval: short side 256, centre 224
        (500, 333, (0, 0, 500, 333), (384, 256), (80, 16)),
        (224, 224, (0, 0, 224, 224), (224, 224), (0, 0)),      # no resize at all
    ]:
        cases.append((rng.integers(0, 256, (h, w, 3), dtype=np.uint8), box, out, window))
    return cases


@pytest.mark.parametrize("device", DEVICES)
def test_gather_resize_is_bit_exact_to_pillow(device) -> None:
    """The GPU's resize kernel, on the CPU (and on CUDA when present), equals Pillow byte for
    byte, for planar and interleaved image layouts in one batch."""
    rng = np.random.default_rng(0)
    cases = _cases(rng)
    images = []
    for i, (px, *_) in enumerate(cases):
        hwc = torch.from_numpy(px).to(device)
        images.append(hwc.permute(2, 0, 1) if i % 2 else hwc.permute(2, 0, 1).contiguous())
    flips = np.arange(len(cases)) % 3 == 1  # mirrored in the resize, as a view's flip is
    got = resample(images, np.array([c[1] for c in cases]), np.array([c[2] for c in cases]),
                   np.array([c[3] for c in cases]), 224, kernel="gather", flips=flips).cpu()
    for i, (px, box, out, window) in enumerate(cases):
        ref = _pillow_crop_resize(px, box, out, window, 224)
        ref = torch.from_numpy(np.ascontiguousarray(ref[:, ::-1] if flips[i] else ref)).permute(2, 0, 1)
        assert torch.equal(got[i], ref), (i, box, out)
    pil = resample([im.cpu() for im in images], np.array([c[1] for c in cases]),
                   np.array([c[2] for c in cases]), np.array([c[3] for c in cases]), 224, kernel="pillow",
                   flips=flips)
    assert torch.equal(pil, got)


def test_random_crops_bit_exact_to_pillow() -> None:
    """Random crops of random sizes (what RandomResizedCrop draws, and beyond) at two output
    sizes: the gather kernel equals Pillow on every one."""
    rng = np.random.default_rng(1)
    for s in (224, 40):
        images, boxes = [], []
        for _ in range(24):
            w, h = (int(v) for v in rng.integers(20, 520, 2))
            images.append(torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)))
            cw, ch = int(rng.integers(1, w + 1)), int(rng.integers(1, h + 1))
            boxes.append((int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1)), cw, ch))
        n = len(images)
        flips = rng.random(n) < 0.5
        got = resample(images, np.array(boxes), np.full((n, 2), s), np.zeros((n, 2)), s, kernel="gather",
                       flips=flips)
        ref = resample(images, np.array(boxes), np.full((n, 2), s), np.zeros((n, 2)), s, kernel="pillow",
                       flips=flips)
        assert torch.equal(got, ref)
        plain = resample(images, np.array(boxes), np.full((n, 2), s), np.zeros((n, 2)), s, kernel="pillow")
        assert torch.equal(torch.where(torch.from_numpy(flips).view(-1, 1, 1, 1), plain.flip(-1), plain), ref)


def test_batched_erasing_equals_one_box_at_a_time() -> None:
    rng = np.random.default_rng(2)
    s, n = 64, 12
    recs = np.zeros((n, V.NUM_FIELDS), np.int64)
    for i in range(n):
        if i % 3:  # a third not erased
            w, h = (int(v) for v in rng.integers(1, s, 2))
            recs[i, V.ERASE] = (int(rng.integers(0, s - w + 1)), int(rng.integers(0, s - h + 1)), w, h)
            recs[i, V.ERASE_SEED] = int(rng.integers(-2**31, 2**31))
    views = torch.randn(n, 3, s, s)
    expected = views.clone()
    for i in range(n):
        x, y, w, h = (int(v) for v in recs[i, V.ERASE])
        if w:
            expected[i, :, y:y + h, x:x + w] = erase_noise(int(recs[i, V.ERASE_SEED]), (x, y, w, h), s,
                                                          torch.device("cpu"))
    got = erase(views, to_device(erase_params(recs), torch.device("cpu")))
    assert torch.equal(got, expected)


def test_mixing_equals_each_view_mixed_alone() -> None:
    """The one-lerp mix (per-pixel weight lam, or 0 / 1 around a CutMix box) gives, bit for bit,
    each view mixed on its own: Mixup as lerp(partner, own, lam), CutMix as the partner's pixels
    pasted inside the box, an unmixed view its own base view; from rows in any order, and from
    own rows that are consecutive rows of the base."""
    rng = np.random.default_rng(5)
    s, n, m = 32, 11, 14
    base = torch.randn(m, 3, s, s) * 2
    recs = np.zeros((n, V.NUM_FIELDS), np.int64)
    own, partner = rng.permutation(m)[:n].tolist(), rng.integers(0, m, n).tolist()
    for i in range(n):
        recs[i, V.MIX_MODE] = (V.MIX_MIXUP, V.MIX_CUTMIX, V.MIX_NONE)[i % 3]
        recs[i, V.LAM] = int(rng.integers(0, V.LAM_ONE + 1))
        x0, y0 = (int(v) for v in rng.integers(0, s, 2))
        recs[i, V.MIX_BOX] = (x0, y0, int(rng.integers(x0, s + 1)), int(rng.integers(y0, s + 1)))
    expected = base[own].clone()
    for i in range(n):
        o, p = base[own[i]], base[partner[i]]
        if recs[i, V.MIX_MODE] == V.MIX_MIXUP:
            expected[i] = torch.lerp(p, o, torch.tensor(recs[i, V.LAM] / V.LAM_ONE, dtype=torch.float32))
        elif recs[i, V.MIX_MODE] == V.MIX_CUTMIX:
            x0, y0, x1, y1 = (int(v) for v in recs[i, V.MIX_BOX])
            expected[i, :, y0:y1, x0:x1] = p[:, y0:y1, x0:x1]
    out = torch.full((n, 3, s, s), float("nan"))
    got = mix(base, to_device(mix_params(recs, own, partner), torch.device("cpu")), out, torch.empty(2, n, 3, s, s))
    assert got is out and torch.equal(got, expected)
    # own rows consecutive in the base (the stages' order; read in place, not gathered)
    rest = [r for r in range(m) if r not in own]
    moved = rest[:2] + own + rest[2:]  # base row -> its old row
    where = {old: new for new, old in enumerate(moved)}
    in_place = mix(base[moved], to_device(mix_params(recs, list(range(2, 2 + n)), [where[q] for q in partner]),
                                          torch.device("cpu")), torch.empty(n, 3, s, s), torch.empty(2, n, 3, s, s))
    assert torch.equal(in_place, expected)
    recs[:, V.MIX_MODE] = V.MIX_NONE  # no view mixed: one gather of the own rows
    unmixed = mix(base, to_device(mix_params(recs, own, partner), torch.device("cpu")), out, torch.empty(0))
    assert torch.equal(unmixed, base[own])


def test_results_outlive_the_reused_workspace() -> None:
    """A CPU keeps one workspace per thread between batches: a batch's views are its own tensor,
    untouched by the next batches (larger, the same size, smaller), and the same batch renders
    the same again."""
    big_items, big_recs, recipe = _batch(40, 48, seed=8)
    _render(big_items, big_recs, recipe)  # the workspace is at its largest from here on
    items, recs, _ = _batch(12, 48, seed=7)
    first = _render(items, recs, recipe)
    kept = first.clone()
    _render(*_batch(12, 48, seed=9)[:2], recipe)
    _render(big_items, big_recs, recipe)
    _render(items[:4], V.sample_shard_records(recipe, 3, 0, 0, list(range(4)), [(48, 48)] * 4), recipe)
    assert torch.equal(first, kept) and torch.equal(_render(items, recs, recipe), kept)


def _batch(n: int, s: int, seed: int = 0) -> tuple[list, np.ndarray, Recipe]:
    recipe = Recipe(img_size=s)
    rng = np.random.default_rng(seed)
    jpegs = [_jpeg(rng, int(rng.integers(3 * s // 2, 2 * s)), int(rng.integers(s, 2 * s))) for _ in range(n)]
    recs = V.sample_shard_records(recipe, 3, 0, 0, list(range(n)), [V.image_size(j) for j in jpegs])
    return [worker_image(j, str(i)) for i, j in enumerate(jpegs)], recs, recipe


def _jpeg(rng: np.random.Generator, w: int, h: int) -> bytes:
    """A small photo-like JPEG: smooth colour fields and grain."""
    field = Image.fromarray(rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8))
    pixels = np.asarray(field.resize((w, h), Image.BICUBIC), np.float32) + rng.normal(0, 6, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _render(items: list, recs: np.ndarray, recipe: Recipe) -> torch.Tensor:
    return next(render_encoded(items, [recs], list(range(len(items))), recipe, torch.device("cpu")))


def test_cpu_stream_equals_gpu_stream(monkeypatch) -> None:
    """The CPU's chunked passes and Pillow resize give the very views of the whole-batch op
    stream a GPU runs (here on the CPU): the CPU tests test the GPU's numbers. A CPU pass takes
    up to 196 views of 64 px, so the chunk is shrunk to 16 of them here, splitting 40 views into
    16, 16 and 8 as it splits views of 224 px."""
    items, recs, recipe = _batch(40, 64)
    whole = _render(items, recs, recipe)
    monkeypatch.setattr(engine, "_CPU_CHUNK_PIXELS", 16 * 64 * 64)
    cpu = _render(items, recs, recipe)
    with gpu_op_stream():
        gpu = _render(items, recs, recipe)
    assert torch.equal(cpu, gpu) and torch.equal(whole, gpu)
    images = decode_images(items[:6], torch.device("cpu"))
    with gpu_op_stream():
        assert torch.equal(eval_views(images, recipe), eval_views(images, recipe))


def test_launches_and_transfers_per_batch_do_not_grow_with_it() -> None:
    """Counted on the CPU as a GPU would run them: at most 600 kernel launches per 256 views,
    the very same count at 512 (one decode group each), at most 8 host-to-device transfers, no
    device reads."""
    counts = {}
    for n in (256, 512):
        items, recs, recipe = _batch(n, 48, seed=n)
        with gpu_op_stream():
            counts[n] = count_ops(lambda: _render(items, recs, recipe))
    assert counts[256].launches <= 600, counts
    assert counts[512].launches == counts[256].launches, counts
    assert counts[512].transfers == counts[256].transfers <= 8, counts
    assert all(c.reads == 0 for c in counts.values()), counts


def test_many_record_sets_are_built_in_passes_the_decode_budget_bounds(monkeypatch) -> None:
    """Stage one builds a unit's every epoch from one decode; the crops of all its epochs were
    held at once (1.2 GB for 30 epochs of 256 rows at 224 px). Sets whose crops exceed the
    decode budget are built in passes, each decoding again: the same views, and the memory of
    the budget whatever the epochs per unit."""
    items, _, recipe = _batch(12, 48)
    sets = [V.sample_shard_records(recipe, 3, e, 0, list(range(12)), [V.image_size(j) for j in items]) for e in range(6)]
    whole = [v.clone() for v in render_encoded(items, sets, list(range(12)), recipe, torch.device("cpu"))]
    decodes = []
    real = engine.decoded_in_budget
    monkeypatch.setattr(engine, "decoded_in_budget", lambda *a, **k: decodes.append(1) or real(*a, **k))
    monkeypatch.setenv(engine.BUDGET_ENV, str(2 * 12 * 48 * 48))  # two sets' crops a pass
    passes = [v.clone() for v in render_encoded(items, sets, list(range(12)), recipe, torch.device("cpu"))]
    assert len(decodes) == 3 and all(torch.equal(a, b) for a, b in zip(whole, passes))


def test_one_axis_warps_equal_the_full_warp_bit_for_bit() -> None:
    """Shears and translations along x keep rows on rows (y: columns on columns), so their warp
    leaves out the taps of weight 0: the same numbers as all 16 taps, to the bit."""
    from civt_cache.views.ops import _affine_matrix, _warp_affine

    rng = np.random.default_rng(3)
    v = torch.from_numpy(rng.integers(0, 256, (10, 3, 40, 40)).astype(np.float32))
    fill = torch.tensor([124.0, 116.0, 104.0]).view(1, 3, 1, 1)
    for along, names in (("x", ("ShearX", "TranslateXRel")), ("y", ("ShearY", "TranslateYRel"))):
        mats = torch.tensor(np.stack([_affine_matrix(names[i % 2], float(rng.uniform(0, 1)),
                                                     float(rng.choice([-1, 1])), 40) for i in range(10)]),
                            dtype=torch.float32)
        full = _warp_affine(v, mats, fill, out=torch.empty_like(v))
        assert torch.equal(_warp_affine(v, mats, fill, out=torch.empty_like(v), along=along), full), along
