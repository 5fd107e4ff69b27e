"""``train-teacher`` and ``eval``: train a conv or involution teacher on shards with a standard
recipe (random-resized crops and flips, label smoothing, AdamW or SGD, warmup + cosine), and
evaluate any checkpoint. The checkpoint records arch, classes, image size and normalisation,
so ``ARCH:CHECKPOINT`` is all a cache needs."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import timm
import torch
from tqdm import tqdm

from civt_cache.data.manifest import load_manifest, require_same_classes
from civt_cache.distributed import DistInfo, device_autocast, distributed_session
from civt_cache.errors import ConfigError
from civt_cache.fsutil import sha256_file
from civt_cache.loader.batches import (
    EpochSource,
    StudentBatches,
    batch_inputs,
    batch_loader,
    epoch_plan,
    planned_steps,
    steps_per_epoch,
)
from civt_cache.progress import Progress
from civt_cache.train.evaluate import evaluate, plain_logits
from civt_cache.train.losses import soft_ce
from civt_cache.train.optim import optimizer_and_schedule
from civt_cache.stopping import check_stop, say_kept
from civt_cache.train.records import save_checkpoint
from civt_cache.train.runs import load_checkpoint, resume_differences
from civt_cache.views.recipe import Recipe


@dataclass
class TeacherJob:
    manifest: Path | str  # a file, or an s3:// gs:// https:// URL
    val_manifest: Path | str
    arch: str
    out: Path
    epochs: int = 30
    img_size: int = 224
    seed: int = 0
    batch_size: int = 128
    opt: str = "adamw"
    lr: float | None = None  # adamw: 1e-3 x batch/256; sgd: 0.1 x batch/256 (RedNet recipe)
    weight_decay: float | None = None  # adamw 0.05, sgd 1e-4
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    crop_scale_min: float = 0.35
    workers: int = 2
    device: str = "auto"
    threads: int = 0  # intra-op threads; 0: OMP_NUM_THREADS if set, else cores less workers
    views: str = "plain"  # "plain": crops and flips; "recipe": the pipeline's own views
    recipe: Recipe = field(default_factory=Recipe)  # the pipeline's [recipe], for views = "recipe"

    def __post_init__(self) -> None:
        if self.views not in ("plain", "recipe"):
            raise ConfigError(f"train-teacher views {self.views!r}: 'plain' (crops and flips) or 'recipe' "
                              "(the pipeline's [recipe])")


def teacher_recipe(job: TeacherJob) -> Recipe:
    """``plain``: crops and flips only, the standard supervised recipe, scaled to small data by a
    larger minimum crop. ``recipe``: the very views a cache of the pipeline will ask the teacher
    about (RandAugment, erasing, Mixup/CutMix with their soft targets), so that it can read
    them where plain training leaves it guessing (small images, heavy augmentation)."""
    if job.views == "recipe":
        return replace(job.recipe, img_size=job.img_size)
    return Recipe(img_size=job.img_size, crop_scale=(job.crop_scale_min, 1.0), hflip=job.recipe.hflip,
                  randaugment="", erase_prob=0.0, mix_prob=0.0)


def train_teacher(job: TeacherJob) -> dict[str, Any]:
    with distributed_session(job.device, job.threads, job.workers) as info:
        return _train(job, info)


def _train(job: TeacherJob, info: DistInfo) -> dict[str, Any]:
    if info.distributed:
        raise ConfigError("train-teacher runs in one process; use torchrun for the two stages")
    manifest, val = load_manifest(job.manifest), load_manifest(job.val_manifest)
    require_same_classes(manifest, str(job.manifest), val, str(job.val_manifest))
    recipe = teacher_recipe(job)
    torch.manual_seed(job.seed)
    try:
        model = timm.create_model(job.arch, num_classes=manifest.num_classes).to(info.device)
    except RuntimeError as e:
        raise ConfigError(f"unknown architecture {job.arch!r} ({e})") from None
    sgd = job.opt.lower() == "sgd"
    lr = job.lr if job.lr is not None else (0.1 if sgd else 1e-3) * job.batch_size / 256
    wd = job.weight_decay if job.weight_decay is not None else (1e-4 if sgd else 0.05)
    steps = [steps_per_epoch(manifest, 1, job.batch_size)] * job.epochs
    if steps[0] == 0:
        raise ConfigError(f"batch size {job.batch_size} exceeds the {manifest.num_samples} samples")
    optimizer, schedule = optimizer_and_schedule(model, job.opt, lr, wd, sum(steps),
                                                 int(job.warmup_epochs * steps[0]), lr * 1e-3)
    first, step, spent = _resumed(job, model, optimizer, schedule)
    start, done = time.perf_counter() - spent, [first]  # done[0]: epochs kept in the resume file
    say_kept(lambda: (f"{resume_file(job)} keeps {done[0]} of {job.epochs} epoch(s); the same command continues "
                      "from there") if done[0] else "no epoch was finished yet, so nothing is kept; the same "
                                                     "command starts again")
    bar = Progress(sum(steps), f"train-teacher {job.arch}", "steps", initial=step)
    for epoch in range(first, job.epochs):
        data = StudentBatches(manifest, recipe, job.seed,
                              epoch_plan(manifest, job.seed, epoch, 0, 1, job.batch_size, job.workers),
                              EpochSource(epoch, job.seed), views_in_workers=info.device.type == "cpu")
        model.train()
        for _, batch in planned_steps(batch_loader(data, job.workers), data, epoch):
            check_stop()
            x, target, _ = batch_inputs(batch, recipe, manifest.num_classes, job.label_smoothing, info.device)
            with device_autocast(info.device):
                loss = soft_ce(model(x), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            schedule.step_update(step)
            bar.update(1, loss=f"{loss.item():.3f}", epoch=epoch + 1)
        if epoch + 1 < job.epochs:  # the last epoch's state is the checkpoint itself
            save_checkpoint(resume_file(job), {
                "job": _resume_record(job), "epoch": epoch + 1, "step": step, "seconds": time.perf_counter() - start,
                "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(), "rng_cpu": torch.get_rng_state()})
            done[0] = epoch + 1
    bar.close()
    metrics = evaluate(model, val, recipe, info, plain_logits, job.batch_size, job.workers)
    state = {"state_dict": model.state_dict(), "arch": job.arch, "num_classes": manifest.num_classes,
             "classes": manifest.classes,
             "img_size": job.img_size, "mean": list(recipe.mean), "std": list(recipe.std),
             "val_top1": metrics["val_top1"], "val_top5": metrics["val_top5"],
             "train_seconds": time.perf_counter() - start}
    save_checkpoint(job.out, state)
    resume_file(job).unlink(missing_ok=True)
    return {**{k: v for k, v in state.items() if k != "state_dict"}, "sha256": sha256_file(job.out)}


def resume_file(job: TeacherJob) -> Path:
    """Where train-teacher keeps its state after each epoch but the last (``OUT.resume``): a rerun
    of the same command continues from it, and the finished checkpoint replaces it."""
    return job.out.with_name(job.out.name + ".resume")


def _resume_record(job: TeacherJob) -> dict[str, Any]:
    """The job as JSON, kept in the resume file: a resume must share its settings but those
    ``train.runs.RESUMABLE_CHANGES`` names (where and how fast it runs)."""
    record = {**asdict(job), "recipe": job.recipe.to_json()}
    return {k: str(v) if isinstance(v, Path) else v for k, v in record.items()}


def _resumed(job: TeacherJob, model: torch.nn.Module, optimizer: Any, schedule: Any) -> tuple[int, int, float]:
    """(first epoch, steps done, seconds spent) of this start: a stopped run of the same settings
    is continued from its ``resume_file``, one of other settings refused, saying what differs."""
    path = resume_file(job)
    if not path.exists():
        return 0, 0, 0.0
    state = load_checkpoint(path)
    diffs = resume_differences(state.get("job", {}), _resume_record(job))
    if diffs:
        raise ConfigError(f"{path}: holds a stopped train-teacher run with other settings ({'; '.join(diffs)}); "
                          "give its settings to continue it, or remove the file to start over")
    model.load_state_dict(state["state_dict"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["rng_cpu"])
    tqdm.write(f"train-teacher: resuming from {path}: {state['epoch']} of {job.epochs} epoch(s) done")
    return int(state["epoch"]), int(state["step"]), float(state["seconds"])
