"""``civt-cache bench imagenet``: both stages' benchmarks on synthetic ImageNet-shaped shards
(``data/synthetic.py``) with the paper's teachers (RegNetY-600MF + RedNet-26, random weights,
1000 classes), k = 10, 224 px, civt_tiny, with the peak memory of each stage (RSS summed over
the process tree, and /dev/shm, which DataLoader workers use to hand over tensors).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import timm
import torch

from civt_cache.bench.cache import format_cache, measure_cache
from civt_cache.bench.student import format_student, measure_student
from civt_cache.errors import ConfigError
from civt_cache.stages.cache_teachers import CacheJob
from civt_cache.stages.train_student import StudentJob
from civt_cache.views.recipe import Recipe

PAPER_TEACHERS = {"conv": "regnety_006", "inv": "rednet26"}


def bench_imagenet(samples: int, device: str = "auto", workers: int = 2, teacher_batch: int = 64,
                   student_batch: int = 16, steps: int = 8, online: bool = True) -> str:
    """Both stages on ``samples`` synthetic ImageNet-shaped images (see the module docstring)."""
    from civt_cache.data.synthetic import write_imagenet_like

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
