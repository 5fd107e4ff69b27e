"""Stage two, ``train-student``: train CivT from images plus the cached teacher targets, read top
to bottom: set up, check the cache fits, build model/optimiser, loop over epochs and steps,
evaluate, checkpoint, write metrics. ``--online`` computes the same targets with live teachers.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.utils import ModelEmaV3
from tqdm import tqdm

from civt_cache.config import MAX_BATCH, MAX_EPOCHS, MAX_WORKERS, require
from civt_cache.data.manifest import load_manifest, load_training_manifest, require_same_classes
from civt_cache.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    data_parallel,
    device_layout,
    distributed_session,
    lost_ranks_named,
    same_steps_on_every_rank,
)
from civt_cache.errors import ConfigError, NonFiniteError
from civt_cache.fsutil import folder_problem
from civt_cache.loader.batches import (
    StudentBatches,
    batch_inputs,
    batch_loader,
    coverage_line,
    epoch_plan,
    planned_steps,
    steps_per_epoch,
)
from civt_cache.loader.cached import TargetSource
from civt_cache.loader.prefetch import prefetched
from civt_cache.models.teachers import parse_teacher_spec
from civt_cache.progress import Progress
from civt_cache.train.evaluate import civt_heads, evaluate
from civt_cache.train.loss_window import LossWindow, bad_batch, show_progress
from civt_cache.train.losses import LossWeights
from civt_cache.train.optim import optimizer_and_schedule, schedule_warnings
from civt_cache.train.records import (
    append_metrics,
    log_scalars,
    plot_curves,
    save_checkpoint,
    save_epoch_weights,
    tensorboard_writer,
    write_args,
    write_results,
    write_summary,
)
from civt_cache.train.runs import (
    RunLock,
    checkpoint_position,
    kept_by_checkpoint,
    open_run,
    removed_unless_checkpointed,
)
from civt_cache.models.civt import coadvise_student
from civt_cache.stopping import check_stop, say_kept
from civt_cache.train.step import train_step
from civt_cache.views.recipe import Recipe

TEACHER_SETS = {"both": ("conv", "inv"), "conv": ("conv",), "inv": ("inv",), "none": ()}


@dataclass
class StudentJob:
    """Every setting of ``train-student`` (flags and/or the pipeline's [student] table)."""

    manifest: Path | str  # a file, or an s3:// gs:// https:// URL
    val_manifest: Path | str
    out: Path
    cache: Path | str | None = None  # a folder, or an s3:// / gs:// prefix
    model: str = "civt_tiny"
    epochs: int = 300
    teachers: str = "both"
    online: bool = False
    teacher: list[str] = field(default_factory=list)  # NAME=ARCH:CKPT (online, or to check the cache)
    seed: int = 0  # the student's: initialisation, drop path, data order
    view_seed: int | None = None  # the views' seed without a cache [--seed]; a cache brings its own
    cycle_cache: bool = False  # train past the cached epochs by replaying them (epoch e -> e mod E)
    recipe: Recipe = field(default_factory=Recipe)
    batch_size: int = 128
    lr: float | None = None  # default 5e-4 x global batch / 512 (DeiT)
    weight_decay: float = 0.05
    warmup_epochs: float = 20.0  # the official recipe's (pipelines/coadvise-imagenet.toml), as below
    min_lr: float = 1e-5
    clip_grad: float = 15.0  # 5 per loss term, three terms
    label_smoothing: float = 0.1
    temperature: float = 1.0
    w_ce: float = 1.0
    w_conv: float = 1.0
    w_inv: float = 1.0
    renormalize: bool = False
    drop_path: float = 0.0  # the released runs train without (DeiT's 0.1 is in its config only)
    workers: int = 2
    threads: int = 0  # intra-op threads; 0: OMP_NUM_THREADS if set, else cores less workers
    device: str = "auto"
    compile: bool = False
    checkpoint_every: int = 0  # steps; 0: at epoch ends only
    checkpoint_hist: int = 10  # checkpoint-N.pth.tar of the best epochs kept (timm's --checkpoint-hist)
    log_every: int = 20  # steps between reads of the loss from the device (progress, NaN check)
    prefetch: bool = True  # build the next batch while the current one trains
    model_ema: bool = False  # keep an exponential moving average of the weights (timm's ModelEmaV3)
    model_ema_decay: float = 0.9998
    log: str = ""  # "tensorboard": also log every epoch's metrics to RUN/tb
    resume: bool = False
    force: bool = False  # a fresh run may replace another run's files in ``out``
    max_steps: int = 0  # stop after this many steps in all (tests and benchmarks); 0: no limit
    allow_sorted_shards: bool = False  # train on shards sorted by class (``data.spread``) deliberately

    def __post_init__(self) -> None:
        problem = folder_problem(self.out)  # why --out cannot be the folder written into, if it cannot
        students = timm.list_models("civt_*")
        require("train-student",
                model=(self.model, self.model in students, f"a CivT model: {', '.join(students)}"),
                teachers=(self.teachers, self.teachers in TEACHER_SETS, f"one of {list(TEACHER_SETS)}"),
                out=(str(self.out), problem is None, f"a folder (that path is {problem})"),
                epochs=(self.epochs, 1 <= self.epochs <= MAX_EPOCHS, f"in 1..{MAX_EPOCHS}"),
                batch_size=(self.batch_size, 1 <= self.batch_size <= MAX_BATCH, f"in 1..{MAX_BATCH}"),
                workers=(self.workers, 0 <= self.workers <= MAX_WORKERS, f"in 0..{MAX_WORKERS}"),
                threads=(self.threads, 0 <= self.threads <= MAX_WORKERS, f"in 0..{MAX_WORKERS} (0: auto)"),
                lr=(self.lr, self.lr is None or self.lr > 0, "> 0"),
                temperature=(self.temperature, self.temperature > 0, "> 0 (it divides the logits)"),
                label_smoothing=(self.label_smoothing, 0 <= self.label_smoothing < 1, "in [0, 1)"),
                clip_grad=(self.clip_grad, self.clip_grad >= 0, ">= 0 (0: off)"),
                drop_path=(self.drop_path, 0 <= self.drop_path < 1, "in [0, 1)"),
                checkpoint_every=(self.checkpoint_every, self.checkpoint_every >= 0, ">= 0"),
                log_every=(self.log_every, self.log_every >= 1, ">= 1"),
                max_steps=(self.max_steps, self.max_steps >= 0, ">= 0"),
                model_ema_decay=(self.model_ema_decay, 0 < self.model_ema_decay < 1, "in (0, 1)"),
                device=(self.device, self.device in ("auto", "cpu", "cuda"), "auto, cpu or cuda"))
        require("train-student", log=(self.log, self.log in ("", "tensorboard"), "'' or tensorboard"))
        if self.log == "tensorboard":
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                raise ConfigError("--log tensorboard needs the tensorboard package: "
                                  "pip install 'civt-cache[tensorboard]'") from None
        for spec in self.teacher:
            parse_teacher_spec(spec)


def train_student(job: StudentJob) -> dict[str, Any]:
    with distributed_session(job.device, job.threads, job.workers) as info:
        lock = RunLock(job.out)
        with removed_unless_checkpointed(job.out, lock, info.is_main):
            return _train(job, info, lock)


def _train(job: StudentJob, info: DistInfo, lock: RunLock) -> dict[str, Any]:
    log = (lambda msg: tqdm.write(f"train-student: {msg}")) if info.is_main else (lambda msg: None)
    manifest = load_training_manifest(job.manifest, job.allow_sorted_shards, log)  # before the run folder is made
    val_manifest = load_manifest(job.val_manifest)
    require_same_classes(manifest, str(job.manifest), val_manifest, str(job.val_manifest))
    val_manifest.check_shard_files()
    teachers = TargetSource(TEACHER_SETS[job.teachers], job.online, job.teacher, job.cache, manifest,
                            job.manifest, job.recipe, job.epochs, job.cycle_cache,
                            job.seed if job.view_seed is None else job.view_seed, job.view_seed is not None,
                            info.device, log)
    state, done = open_run(job.out, job.resume, job.force, job_record(job), job.epochs, info, lock, log)
    if done is not None:
        return done
    run = _Run(job, info, manifest, val_manifest, teachers, log)
    if state is not None:
        run.resume(state)
    say_kept(run.kept)
    try:
        with lost_ranks_named(info, lambda: run.position):
            return run.fit()
    finally:
        run.close()


class _Run:
    """One rank's train-student run, in the shape of timm's train.py: built (model, optimizer,
    schedule, loss window, EMA, logs), resumed if asked, then epochs of steps, each ended by
    evaluation, the run records and a checkpoint."""

    def __init__(self, job: StudentJob, info: DistInfo, manifest: Any, val_manifest: Any, teachers: TargetSource,
                 log: Any) -> None:
        self.job, self.info, self.manifest, self.teachers, self.log = job, info, manifest, teachers, log
        self.val_manifest = val_manifest
        self.device = device = info.device
        self.ckpt_path = job.out / "last.pth.tar"
        torch.manual_seed(job.seed + info.rank)  # per-rank drop path (DDP broadcasts rank 0's weights)
        self.model = coadvise_student(job.model, num_classes=manifest.num_classes, img_size=job.recipe.img_size,
                                      drop_path_rate=job.drop_path).to(device)
        self.model = device_layout(self.model, device)
        batch = job.batch_size * info.world_size  # the global batch
        lr = job.lr if job.lr is not None else 5e-4 * batch / 512
        for said in schedule_warnings(lr, job.lr is None, batch, job.warmup_epochs, job.epochs):
            log(f"warning: {said}")
        if job.recipe.mixing and job.recipe.mix_mode == "batch" and job.batch_size != job.recipe.mix_batch:
            log(f"warning: batches of {job.batch_size} per rank, Mixup/CutMix draws shared by blocks of "
                f"{job.recipe.mix_batch} views (the recipe's mix_batch): a batch does not hold one draw as timm's")
        self.steps = [steps_per_epoch(manifest, info.world_size, job.batch_size)] * job.epochs
        if self.steps[0] == 0:
            raise ConfigError(f"batch size {job.batch_size} x {info.world_size} rank(s) exceeds the "
                              f"{manifest.num_samples} samples: no whole step per epoch")
        log(coverage_line(manifest, info.world_size, job.batch_size))
        self.optimizer, self.schedule = optimizer_and_schedule(
            self.model, "adamw", lr, job.weight_decay, sum(self.steps), int(job.warmup_epochs * self.steps[0]),
            job.min_lr)
        if info.is_main:  # temp files of checkpoint writes a kill interrupted
            for orphan in job.out.glob(f".{self.ckpt_path.name}.*.tmp"):
                orphan.unlink(missing_ok=True)
        self.start_epoch, self.start_step, self.global_step = 0, 0, 0
        self.saved: tuple[int, int] | None = None  # (epoch, step) of the last checkpoint, said on a stop
        # the workers the epoch in progress was planned for; the (epoch, step) being run, for errors
        self.plan_workers, self.position = job.workers, (0, 0)
        self.sums = {"loss": 0.0, "ce": 0.0, "conv": 0.0, "inv": 0.0, "n": 0.0, "seconds": 0.0}
        self.tick = time.perf_counter()  # when the seconds in ``sums`` were last counted
        self.window = LossWindow(job.log_every, self.sums, lambda value, where: bad_batch(value, where, manifest))
        self.ema = ModelEmaV3(self.model, decay=job.model_ema_decay) if job.model_ema else None
        self.board = tensorboard_writer(job.out) if job.log == "tensorboard" and info.is_main else None
        if info.is_main:
            write_args(job.out, {**job_record(job), "world_size": info.world_size})
        self.ddp_model = data_parallel(self.model, info)
        if job.compile:
            self.ddp_model = torch.compile(self.ddp_model)
        self.weights = LossWeights(job.w_ce, job.w_conv, job.w_inv, job.temperature)
        self.rows: list[dict[str, Any]] = []

    def resume(self, state: dict[str, Any]) -> None:
        """Weights, optimizer, schedule, position, and this rank's RNG, loss sums and buffers."""
        self.model.load_state_dict(state["state_dict"])
        if self.ema is not None:
            self.ema.module.load_state_dict(state["state_dict_ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.start_epoch, self.start_step, self.global_step = state["epoch"], state["step"], state["global_step"]
        self.plan_workers = int(state.get("plan_workers", self.job.workers))
        mine = state["ranks"][self.info.rank]
        self.sums.update(mine["sums"])
        for name, buffer in self.model.named_buffers():  # this rank's own BatchNorm statistics
            buffer.copy_(mine.get("buffers", {}).get(name, buffer))
        torch.set_rng_state(mine["rng_cpu"])
        if self.device.type == "cuda" and mine["rng_cuda"] is not None:
            torch.cuda.set_rng_state(mine["rng_cuda"], self.device)
        self.saved = (self.start_epoch, self.start_step)
        self.log(f"resumed from {self.ckpt_path}: {checkpoint_position(self.start_epoch, self.start_step, self.job.epochs)}")

    def fit(self) -> dict[str, Any]:
        job = self.job
        for epoch in range(self.start_epoch, job.epochs):
            if self.train_epoch(epoch, self.start_step if epoch == self.start_epoch else 0):
                return {"stopped_at": self.stopped_at, "global_step": self.global_step,
                        "checkpoint": str(self.ckpt_path), "rank": self.info.rank}
            self.end_epoch(epoch)
            if job.max_steps and self.global_step >= job.max_steps:
                break
        rows = self.rows
        results = {"model": job.model, "teachers": job.teachers, "online": bool(self.teachers.live),
                   "epochs": job.epochs, **({k: v for k, v in rows[-1].items() if k.startswith("val_")} if rows else {}),
                   "img_per_s": rows[-1]["img_per_s"] if rows else None,
                   "train_seconds": sum(r["train_seconds"] for r in rows)}
        if self.info.is_main:  # the other ranks report nothing: one run, one result
            write_results(job.out, results)
            return {**results, "results_file": str(job.out / "results.json")}
        return results

    def train_epoch(self, epoch: int, skip: int) -> bool:
        """Steps ``skip`` .. the epoch's end; True when ``--max-steps`` stopped it mid-epoch (then
        checkpointed, resumable)."""
        job, info, device, sums, window = self.job, self.info, self.device, self.sums, self.window
        steps = self.steps[epoch]
        if skip == 0:  # an epoch resumed mid-way keeps the plan it was started with
            self.plan_workers = job.workers
        plan = epoch_plan(self.manifest, job.seed, epoch, info.rank, info.world_size, job.batch_size,
                          self.plan_workers)
        dataset = StudentBatches(self.manifest, job.recipe, job.seed, plan, self.teachers.source(epoch), skip,
                                 views_in_workers=device.type == "cpu")
        # its own generator: creating the iterator must not draw from the global RNG, whose
        # state (drop-path masks) a resumed run restores mid-epoch
        loader = batch_loader(dataset, job.workers, torch.Generator().manual_seed(job.seed + epoch))
        if skip == 0:
            sums.update(dict.fromkeys(sums, 0.0))
        self.ddp_model.train()
        bar = Progress(steps, f"epoch {epoch + 1}/{job.epochs}", "steps", info.is_main, skip)
        self.tick = time.perf_counter()

        def inputs(item: tuple[int, Any]) -> tuple[int, Any, torch.Tensor, torch.Tensor, dict]:
            step, batch = item  # decoded and augmented on the device
            return (step, batch, *batch_inputs(batch, job.recipe, self.manifest.num_classes,
                                               job.label_smoothing, device, job.renormalize))

        for step, batch, x, ce_target, cached in prefetched(
                planned_steps(loader, dataset, epoch, info.rank, info.world_size), inputs, device, job.prefetch):
            self.position = (epoch, step)
            check_stop()
            targets = self.teachers.targets(x, cached, job.recipe, device)
            loss, parts = train_step(self.ddp_model, self.optimizer, x, ce_target, targets, self.weights,
                                     job.clip_grad)
            self.global_step += 1
            if self.ema is not None:
                self.ema.update(self.model, step=self.global_step)
            self.schedule.step_update(self.global_step)
            if window.add(loss, parts, x.shape[0], (self.global_step, epoch, step, batch.rows[:batch.size])):
                self.tick = show_progress(bar, window, sums, self.tick, info.world_size)
            bar.update(1)
            if job.checkpoint_every and self.global_step % job.checkpoint_every == 0 and step + 1 < steps:
                self.checkpoint(epoch, step + 1)
            if job.max_steps and self.global_step >= job.max_steps and step + 1 < steps:
                bar.close()
                self.checkpoint(epoch, step + 1)  # stopped mid-epoch: resumable, no epoch metrics
                self.stopped_at = {"epoch": epoch, "step": step + 1}
                return True
        window.read()
        self.tick = show_progress(bar, window, sums, self.tick, info.world_size)
        bar.close()
        same_steps_on_every_rank(info, f"train-student: epoch {epoch + 1}", steps - skip)
        return False

    def end_epoch(self, epoch: int) -> None:
        """Evaluate, write the epoch's records (rank 0), checkpoint at the next epoch's start."""
        job, info, sums = self.job, self.info, self.sums
        totals = all_reduce_sum(info, [sums["loss"], sums["ce"], sums["conv"], sums["inv"], sums["n"]])
        metrics = evaluate(self.ddp_model, self.val_manifest, job.recipe, info, civt_heads,
                           job.batch_size, job.workers)
        if self.ema is not None:
            metrics.update({f"ema_{k}": v for k, v in evaluate(
                self.ema.module, self.val_manifest, job.recipe, info, civt_heads, job.batch_size,
                job.workers).items()})
        n = max(totals[4], 1)
        row = {"epoch": epoch, "cache_epoch": self.teachers.cache_epoch(epoch),
               "train_loss": totals[0] / n, "loss_ce": totals[1] / n, "loss_conv": totals[2] / n,
               "loss_inv": totals[3] / n, "lr": self.optimizer.param_groups[0]["lr"],
               "steps": self.steps[epoch], "img_per_s": sums["n"] * info.world_size / max(sums["seconds"], 1e-9),
               "train_seconds": sums["seconds"], **metrics}
        if info.is_main:
            self.rows = append_metrics(job.out, row)
            write_summary(job.out, self.rows)
            if self.board is not None:
                log_scalars(self.board, row)
            save_epoch_weights(job.out, self.rows, lambda: {
                "state_dict": self.model.state_dict(), "arch": job.model, "img_size": job.recipe.img_size,
                "classes": self.manifest.classes, "args": job_record(job),
                **({"state_dict_ema": self.ema.module.state_dict()} if self.ema is not None else {})},
                job.checkpoint_hist)
            plot_curves(self.rows, job.out / "curves.png", f"{job.model} teachers={job.teachers}"
                        + (" online" if self.teachers.live else ""))
            self.log(f"epoch {epoch + 1}: loss {row['train_loss']:.4f}, val top-1 {row['val_top1']:.2f}% "
                     f"(cls {row['val_top1_cls']:.1f} conv {row['val_top1_conv']:.1f} inv {row['val_top1_inv']:.1f})"
                     + (f", EMA val top-1 {row['ema_val_top1']:.2f}%" if "ema_val_top1" in row else "")
                     + f", {row['img_per_s']:.0f} img/s")
        self.checkpoint(epoch + 1, 0)

    def checkpoint(self, epoch: int, step: int) -> None:
        """Every rank's RNG and loss sums gathered, written by rank 0 if the weights are finite."""
        self.window.read()  # a non-finite loss stops the run before anything is written
        now = time.perf_counter()  # the steps just read count with their seconds: a run resumed
        self.sums["seconds"] += now - self.tick  # from here divides its images by its time
        self.tick = now
        info = self.info
        ranks = all_gather_objects(info, {  # each rank's RNG (drop path), loss sums and buffers
            "rng_cpu": torch.get_rng_state(), "sums": dict(self.sums),
            "buffers": {name: b.detach().cpu() for name, b in self.model.named_buffers()},
            "rng_cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None})
        if info.is_main:
            if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
                raise NonFiniteError(f"{self.ckpt_path}: not written: the weights hold NaN or infinity "
                                     f"at epoch {epoch + 1} step {step}; the last checkpoint is kept")
            save_checkpoint(self.ckpt_path, {
                "state_dict": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), "epoch": epoch, "step": step,
                "global_step": self.global_step, "ranks": ranks, "world_size": info.world_size,
                "plan_workers": self.plan_workers,
                "job": job_record(self.job), "arch": self.job.model,
                "state_dict_ema": self.ema.module.state_dict() if self.ema is not None else None})
            self.saved = (epoch, step)
        barrier(info)

    def kept(self) -> str:
        """What a stop now keeps (rank 0 says it): the last checkpoint's position, and the command."""
        return kept_by_checkpoint(self.ckpt_path, self.saved, self.job.epochs) if self.info.is_main else ""

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def job_record(job: StudentJob) -> dict[str, Any]:
    """The job as JSON: stored in checkpoints, and what the demo compares to reuse a run."""
    d = asdict(job)
    d["recipe"] = job.recipe.to_json()
    return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}
