"""``civt-cache bench student``: student training img/s from the cache, against plain training
(no distillation), online co-advising (teachers run live), the same step on batches pre-built on
the device (the limit: no data path), and plain training from timm's own loader
(``timm.data.create_loader``, same recipe and workers): same student, batch, steps.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from civt_cache.bench.probes import PeakMemory, sync
from civt_cache.cache.store import CacheStore
from civt_cache.data.manifest import load_manifest
from civt_cache.distributed import device_layout, pick_device
from civt_cache.errors import ConfigError
from civt_cache.models.civt import coadvise_student
from civt_cache.stages.train_student import StudentJob, train_student
from civt_cache.train.optim import optimizer_and_schedule


def measure_student(job: StudentJob, teacher_specs: list[str], steps: int,
                    online: bool = True) -> dict[str, Any]:
    """Steady-state img/s of ``train_student`` in each mode (plain, from cache, online): the
    time of a run of 2 + ``steps`` steps minus that of a run of 2 (after an untimed warm-up
    run), so start-up, worker spawn and the stop checkpoint cancel; then the same step on
    pre-built device batches and from timm's loader. Peak memory over all modes."""
    rates = {}
    modes = {"plain (no distillation)": dict(teachers="none", cache=None),
             "from cache (both teachers)": dict(teachers="both")}
    if online:
        modes["online (both teachers live)"] = dict(teachers="both", online=True, cache=None,
                                                    teacher=teacher_specs)
    with PeakMemory() as mem:
        for name, change in modes.items():
            rates[name] = train_rate(replace(job, **change), steps)
        rates["pre-built device batches (limit)"] = measure_prebuilt(job, steps)
        rates["timm create_loader (plain)"] = measure_timm_loader(job, steps)
    return {"model": job.model, "batch_size": job.batch_size, "steps": steps,
            "img_size": job.recipe.img_size, "workers": job.workers, "rates": rates,
            "peak_rss": mem.rss, "peak_shm": mem.shm}


def train_rate(job: StudentJob, steps: int) -> float:
    """Steady-state img/s of ``train_student(job)``: a run of 2 + ``steps`` steps minus one of 2
    (after an untimed warm-up run), which cancels start-up, first batches and the checkpoint."""
    per_epoch = load_manifest(job.manifest).num_samples // job.batch_size
    if steps + 2 >= per_epoch:  # a run must stop inside the first epoch (no evaluation timed)
        raise ConfigError(f"{job.manifest}: {per_epoch} steps of {job.batch_size} per epoch; "
                          f"the bench times runs of {steps + 2} steps: use --steps < {per_epoch - 2}")
    run = replace(job, epochs=max(job.epochs, 2))
    with tempfile.TemporaryDirectory() as tmp:
        train_student(replace(run, max_steps=2, out=Path(tmp) / "warm"))
        spent = []
        for n, out in ((2, "short"), (2 + steps, "long")):
            t0 = time.perf_counter()
            train_student(replace(run, max_steps=n, out=Path(tmp) / out))
            spent.append(time.perf_counter() - t0)
    return steps * job.batch_size / max(spent[1] - spent[0], 1e-9)


def _new_student(job: StudentJob, num_classes: int, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """The student and optimiser ``train_student`` would build for ``job``."""
    torch.manual_seed(job.seed)
    model = coadvise_student(job.model, num_classes=num_classes, img_size=job.recipe.img_size,
                             drop_path_rate=job.drop_path).to(device)
    model = device_layout(model, device)
    optimizer, _ = optimizer_and_schedule(model, "adamw", 1e-4, job.weight_decay, 1000, 0, 1e-5)
    return model.train(), optimizer


def _timed_steps(step, batches: list, steps: int, device: torch.device) -> float:
    """img/s of ``step`` over ``batches`` after two untimed warm-up steps (each step ends with
    ``loss.item()``, as the training loop's progress bar does)."""
    it = iter(batches)
    for _ in range(2):
        step(*next(it)).item()
    sync(device)
    t0, n = time.perf_counter(), 0
    for _ in range(steps):
        x, *rest = next(it)
        step(x, *rest).item()
        n += x.shape[0]
    sync(device)
    return n / (time.perf_counter() - t0)


def measure_prebuilt(job: StudentJob, steps: int) -> float:
    """Stage two's limit: the same student and step from the cache's targets, on batches built
    beforehand and already on the device (no data path at all)."""
    from civt_cache.loader.batches import EpochSource, StudentBatches, batch_inputs, shards_plan
    from civt_cache.stages.train_student import TEACHER_SETS
    from civt_cache.train.losses import LossWeights
    from civt_cache.train.step import train_step

    device = pick_device(job.device)
    manifest = load_manifest(job.manifest)
    names = TEACHER_SETS[job.teachers]
    source = EpochSource(0, CacheStore.open(job.cache).spec.seed, job.cache, 0, names)
    batches = []
    for batch in StudentBatches(manifest, job.recipe, job.seed,
                                shards_plan(manifest, list(range(len(manifest.shards))), job.batch_size), source):
        x, ce, targets = batch_inputs(batch, job.recipe, manifest.num_classes, job.label_smoothing, device,
                                      job.renormalize)
        batches.append((x, ce, targets))
        if len(batches) == steps + 2:
            break
    model, optimizer = _new_student(job, manifest.num_classes, device)
    weights = LossWeights(job.w_ce, job.w_conv, job.w_inv, job.temperature)
    return _timed_steps(lambda x, ce, t: train_step(model, optimizer, x, ce, t, weights, job.clip_grad)[0],
                        batches, steps, device)


class _ShardImages(torch.utils.data.Dataset):
    """A manifest's samples as (PIL image, label) for timm's loader, which sets ``transform``."""

    def __init__(self, manifest) -> None:
        from civt_cache.data.shards import read_shard

        self.samples = [s for i in range(len(manifest.shards)) for s in read_shard(manifest, i)]
        self.transform = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        import io

        from PIL import Image

        with Image.open(io.BytesIO(self.samples[i].image)) as im:
            img = im.convert("RGB")
        if self.transform is None:
            return img, self.samples[i].label
        for _ in range(100):
            try:
                return self.transform(img), self.samples[i].label
            except ValueError:  # timm's PosterizeIncreasing at magnitude 10 asks Pillow >= 12 for
                continue        # 0 bits, which it refuses (~0.2% of views): draw that view again
        raise RuntimeError("timm's transform failed 100 times on one image")


def measure_timm_loader(job: StudentJob, steps: int) -> float:
    """What users would otherwise run: the same student trained plainly (labels only) from
    ``timm.data.create_loader`` with the same recipe (RandAugment, erasing, timm's Mixup/CutMix
    on the device) and the same number of workers."""
    from timm.data import Mixup, create_loader

    from civt_cache.train.losses import LossWeights
    from civt_cache.train.step import train_step

    device = pick_device(job.device)
    manifest = load_manifest(job.manifest)
    r = job.recipe
    loader = create_loader(_ShardImages(manifest), input_size=(3, r.img_size, r.img_size),
                           batch_size=job.batch_size, is_training=True, scale=r.crop_scale,
                           ratio=r.crop_ratio, hflip=r.hflip, auto_augment=r.randaugment or None,
                           interpolation="bicubic", mean=r.mean, std=r.std, re_prob=r.erase_prob,
                           re_mode="pixel", num_workers=job.workers, device=device,
                           use_prefetcher=device.type == "cuda", persistent_workers=False)
    mixup = Mixup(mixup_alpha=r.mixup_alpha, cutmix_alpha=r.cutmix_alpha, prob=r.mix_prob,
                  switch_prob=r.mix_switch_prob, label_smoothing=job.label_smoothing,
                  num_classes=manifest.num_classes)
    model, optimizer = _new_student(job, manifest.num_classes, device)
    weights = LossWeights(job.w_ce, job.w_conv, job.w_inv, job.temperature)

    def batches():
        for x, y in loader:
            x, y = mixup(x.to(device), y.to(device))
            yield device_layout(x, device), y

    return _timed_steps(lambda x, y: train_step(model, optimizer, x, y, {}, weights, job.clip_grad)[0],
                        batches(), steps, device)


def format_student(r: dict[str, Any]) -> str:
    plain = r["rates"]["plain (no distillation)"]
    lines = [f"bench student ({r['model']}, batch {r['batch_size']}, {r['steps']} steps each, "
             f"{r['img_size']}px, {r['workers']} workers)"]
    limit = r["rates"]["pre-built device batches (limit)"]
    lines += [f"  {k:34s} {v:8.1f} img/s  ({v / plain:.2f}x plain, {v / limit:.2f}x the limit)"
              for k, v in r["rates"].items()]
    lines.append(f"  peak memory: {r['peak_rss'] / 2**20:.0f} MiB RSS (process tree), "
                 f"{r['peak_shm'] / 2**20:.1f} MiB /dev/shm")
    return "\n".join(lines)


def bench_student(job: StudentJob, teacher_specs: list[str], steps: int) -> str:
    return format_student(measure_student(job, teacher_specs, steps))
