"""``civt-cache bench cache|student|imagenet``: throughput ratios measured side by side in one
run (``bench views`` is ``bench_views.py``, ``bench threads`` ``bench_threads.py``).

cache:    views/s of the full stage one (read shards, decode, build views, teachers, write
          zarr) against the teachers' forward pass alone on pre-built views of the first unit,
          plus the cache's bytes per view.
student:  student training img/s from the cache, against plain training (no distillation),
          online co-advising (teachers run live), the same step on batches pre-built on the
          device (the limit: no data path), and plain training from timm's own loader
          (``timm.data.create_loader``, same recipe and workers): same student, batch, steps.
imagenet: both of the above on synthetic ImageNet-shaped shards (``synthetic.py``) with the
          paper's teachers (RegNetY-600MF + RedNet-26, random weights, 1000 classes), k = 10,
          224 px, civt_tiny, plus the peak memory of each stage (RSS summed over the process
          tree, and /dev/shm, which DataLoader workers use to hand over tensors).
"""
from __future__ import annotations

import os
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import timm
import torch

from .cache_store import CacheStore
from .distributed import pick_device
from .errors import ConfigError
from .manifest import load_manifest
from .models.teachers import build_teacher, teacher_logits
from .training import optimizer_and_schedule
from .recipe import Recipe
from .stage1 import CacheJob, UnitViews, cache_teachers
from .stage2 import StudentJob, train_student
from .view_engine import render_encoded

PAPER_TEACHERS = {"conv": "regnety_006", "inv": "rednet26"}


class PeakMemory:
    """Peak RSS summed over this process and all its descendants (DataLoader workers), and peak
    growth of /dev/shm, sampled every ``interval`` seconds while the ``with`` block runs."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.rss, self.shm = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._shm0 = _shm_used()

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while True:
            self.rss = max(self.rss, _tree_rss(os.getpid()))
            self.shm = max(self.shm, _shm_used() - self._shm0)
            if self._stop.wait(self.interval):
                return


def _tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and its descendants, from /proc (0 where /proc is absent)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # the process ended meanwhile
                continue
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [c for c, p in parent.items() if p == pid and c not in tree]
        tree.update(children)
        frontier += children
    total = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    return total


def _shm_used() -> int:
    """Bytes in use on /dev/shm (0 where there is none)."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return 0
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def measure_cache(job: CacheJob, out: Path | None = None) -> dict[str, Any]:
    """Full stage one (one epoch, all shards) vs teachers alone; bytes per view; peak memory.
    The one-epoch cache is written to ``out`` (kept) or to a temporary folder."""
    device = pick_device(job.device)
    manifest = load_manifest(job.manifest)
    with tempfile.TemporaryDirectory() as tmp:
        one = replace(job, epochs=1, epochs_per_unit=1, out=out or Path(tmp) / "cache")
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            summary = cache_teachers(one)
            full = summary["views"] / (time.perf_counter() - t0)
        store = CacheStore.open(one.out)
        chunks = sum(store.disk_bytes(chunks_only=True).values())
        files = sum(store.disk_bytes().values())
        first = {(0, 0): store.unit_record(0, 0)}
        group = next(iter(UnitViews(manifest, one.out, list(first), first, job.recipe, job.seed, 1, 1)))
        views = next(render_encoded(group.images, group.records[:1], group.rows, job.recipe, device,
                                    group.names))  # pre-built on the device, outside the timing
    teachers = [build_teacher(t, device) for t in job.teachers]
    batches = [views[i:i + job.batch_size] for i in range(0, len(views), job.batch_size)]
    for t in teachers:  # warm-up: allocator, cuDNN algorithm choice
        teacher_logits(t, batches[0], job.recipe.mean, job.recipe.std, device)
    sync(device)
    t0 = time.perf_counter()
    for chunk in batches:
        for t in teachers:
            teacher_logits(t, chunk, job.recipe.mean, job.recipe.std, device).topk(job.topk, dim=1)
    sync(device)
    alone = len(views) / (time.perf_counter() - t0)
    return {"device": str(device), "data": manifest.name, "views": summary["views"],
            "teachers": len(teachers), "topk": job.topk, "img_size": job.recipe.img_size,
            "batch_size": job.batch_size, "workers": job.workers, "full_views_per_s": full,
            "teachers_alone_views_per_s": alone, "teachers_alone_views": len(views),
            "bytes_per_view": chunks / summary["views"], "file_bytes_per_view": files / summary["views"],
            "peak_rss": mem.rss, "peak_shm": mem.shm}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def format_cache(r: dict[str, Any]) -> str:
    return (f"bench cache on {r['device']} ({r['data']}, {r['views']} views, {r['teachers']} teachers, "
            f"k={r['topk']}, {r['img_size']}px, batch {r['batch_size']}, {r['workers']} workers)\n"
            f"  full stage one:   {r['full_views_per_s']:8.1f} views/s (wall clock incl. start-up)\n"
            f"  teachers alone:   {r['teachers_alone_views_per_s']:8.1f} views/s (pre-built views "
            f"of the first unit, {r['teachers_alone_views']} views)\n"
            f"  ratio full / teachers alone: {r['full_views_per_s'] / r['teachers_alone_views_per_s']:.2f}\n"
            f"  bytes per view: {r['bytes_per_view']:.1f} in chunks (records + all teachers), "
            f"{r['file_bytes_per_view']:.1f} with metadata and progress records\n"
            f"  peak memory: {r['peak_rss'] / 2**20:.0f} MiB RSS (process tree), "
            f"{r['peak_shm'] / 2**20:.1f} MiB /dev/shm")


def bench_cache(job: CacheJob) -> str:
    return format_cache(measure_cache(job))


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
    model = timm.create_model(job.model, num_classes=num_classes, img_size=job.recipe.img_size,
                              drop_path_rate=job.drop_path).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
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
    from .soft_targets import LossWeights
    from .stage2 import TEACHER_SETS, train_step
    from .student_data import EpochSource, StudentBatches, batch_inputs

    device = pick_device(job.device)
    manifest = load_manifest(job.manifest)
    names = TEACHER_SETS[job.teachers]
    source = EpochSource(0, CacheStore.open(job.cache).spec.seed, job.cache, 0, names)
    batches = []
    for batch in StudentBatches(manifest, job.recipe, job.seed, list(range(len(manifest.shards))),
                                source, job.batch_size):
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
        from .shards import read_shard

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

    from .soft_targets import LossWeights
    from .stage2 import train_step

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
            yield (x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x), y

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


def bench_imagenet(samples: int, device: str = "auto", workers: int = 2, teacher_batch: int = 64,
                   student_batch: int = 16, steps: int = 8, online: bool = True) -> str:
    """Both stages on ``samples`` synthetic ImageNet-shaped images (see the module docstring)."""
    from .synthetic import write_imagenet_like

    if steps + 2 >= samples // student_batch:
        raise ConfigError(f"--samples {samples} gives {samples // student_batch} steps of "
                          f"{student_batch}; the student bench needs more than {steps + 2} in one epoch")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        manifest = write_imagenet_like(root / "data", samples, workers=min(workers, 2) or 1)
        made = time.perf_counter() - t0
        avg_kb = sum(s.bytes for s in manifest.shards) / manifest.num_samples / 1e3
        specs = []
        for name, arch in PAPER_TEACHERS.items():
            torch.manual_seed(0)
            path = root / f"{name}_{arch}.pth"
            torch.save(timm.create_model(arch, num_classes=manifest.num_classes).state_dict(), path)
            specs.append(f"{name}={arch}:{path}")
        recipe = Recipe(img_size=224)
        cache_job = CacheJob(manifest.location, specs, root / "cache", topk=10, recipe=recipe,  # type: ignore[arg-type]
                             batch_size=teacher_batch, workers=workers, device=device)
        cache = measure_cache(cache_job, out=cache_job.out)
        student = StudentJob(manifest.location, manifest.location, root / "run",  # type: ignore[arg-type]
                             cache=cache_job.out, model="civt_tiny", epochs=2, recipe=recipe,
                             batch_size=student_batch, workers=workers, device=device,
                             cycle_cache=True, drop_path=0.1)
        stu = measure_student(student, specs, steps, online)
    head = (f"synthetic ImageNet: {manifest.num_samples} JPEGs in {len(manifest.shards)} shard(s), "
            f"{manifest.num_classes} classes, {avg_kb:.0f} KB each (made in {made:.0f}s); teachers "
            + " + ".join(PAPER_TEACHERS.values()) + " (random weights)")
    return "\n".join([head, format_cache(cache), format_student(stu)])
