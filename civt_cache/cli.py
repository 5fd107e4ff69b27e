"""The ``civt-cache`` command line. Each command is a thin shell over a library function."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional

import typer

from civt_cache.bench.cli import bench_app
from civt_cache.data.manifest import data_location, default_manifest_path, load_manifest

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,  # help texts show [defaults] literally
                  help="Cache co-advise teachers once; train CivT students from the cache.")
app.add_typer(bench_app, name="bench")


PIPELINE_OPT = typer.Option(None, "--pipeline", help="Pipeline TOML; flags override it, and it overrides the [defaults] shown.")
THREADS_HELP = ("Intra-op threads [0: OMP_NUM_THREADS if set (torchrun sets 1 per rank), "
                "else the rank's cores less one per worker].")
DATA_KEYS = frozenset({"src", "shards", "name", "shard_size", "manifest", "seed", "skip_bad", "workers"})


@app.command("make-shards")
def make_shards_cmd(
    src: Optional[str] = typer.Argument(None, help="ImageFolder root (one folder per class) or 'digits' [[data] src]."),
    out_dir: Optional[str] = typer.Argument(None, help="Folder (or s3:// / gs:// prefix) for the .tar shards [[data] shards]."),
    pipeline: Optional[Path] = PIPELINE_OPT,
    name: Optional[str] = typer.Option(None, help="Dataset name; shards are NAME-000000.tar ... [[data] name]."),
    shard_size: Optional[int] = typer.Option(None, help="Samples per shard [1000]."),
    manifest: Optional[str] = typer.Option(None, help="(a file or URL) Manifest path [data_manifests/NAME.json]."),
    seed: Optional[int] = typer.Option(None, help="Seed of the shuffle across shards [0]."),
    skip_bad: Optional[bool] = typer.Option(None, "--skip-bad/--no-skip-bad", help="Record undecodable files under 'skipped' and go on [off]."),
    workers: Optional[int] = typer.Option(None, help="Encoding processes [0: min(8, cores)]."),
) -> None:
    """Write WebDataset shards (KEY.jpg + KEY.cls) and their data manifest."""
    from civt_cache.config import load_pipeline, need, setting
    from civt_cache.data.writer import image_folder_items, write_shards
    from civt_cache.errors import ConfigError
    from civt_cache.fsutil import refuse_url

    cfg = load_pipeline(pipeline)
    unknown = set(cfg.get("data", {})) - DATA_KEYS
    if unknown:
        raise ConfigError(f"{pipeline}: [data] has unknown keys {sorted(unknown)}; known: {sorted(DATA_KEYS)}")
    src = need(setting(cfg, "data.src", src, str, pipeline), "SRC", "[data] src")
    refuse_url(src, "SRC")
    out_dir = data_location(need(setting(cfg, "data.shards", out_dir, str, pipeline), "OUT_DIR", "[data] shards"))
    name = need(setting(cfg, "data.name", name, str, pipeline), "--name", "[data] name")
    shard_size = setting(cfg, "data.shard_size", shard_size, int, pipeline, 1000)
    manifest = setting(cfg, "data.manifest", manifest, str, pipeline)
    seed = setting(cfg, "data.seed", seed, int, pipeline, 0)
    skip_bad = setting(cfg, "data.skip_bad", skip_bad, bool, pipeline, False)
    workers = setting(cfg, "data.workers", workers, int, pipeline, 0)
    if src == "digits":
        from civt_cache.data.digits import digits_items

        for split, (classes, items) in digits_items().items():
            split_name = f"{name}-{split}"
            path = (data_location(f"{manifest.removesuffix('.json')}-{split}.json") if manifest
                    else default_manifest_path(split_name))
            m = write_shards(items, classes, out_dir, split_name, shard_size, seed,
                             "sklearn.datasets.load_digits (32x32 RGB)", path, skip_bad, workers)
            typer.echo(f"{path}: {m.num_samples} samples in {len(m.shards)} shards")
        return
    classes, items = image_folder_items(Path(src))
    path = data_location(manifest) if manifest else default_manifest_path(name)
    m = write_shards(items, classes, out_dir, name, shard_size, seed, f"imagefolder:{src}", path,
                     skip_bad, workers)
    typer.echo(f"{path}: {m.num_samples} samples in {len(m.shards)} shards, "
               f"{len(m.skipped)} skipped")


@app.command("scan-shards")
def scan_shards_cmd(
    pattern: str = typer.Argument(..., help="Directory, brace pattern or glob of .tar shards; or their s3://, gs:// or https:// URLs."),
    name: str = typer.Option(..., help="Dataset name."),
    manifest: Optional[str] = typer.Option(None, help="(a file or URL) Manifest path [data_manifests/NAME.json]."),
    classes: Optional[Path] = typer.Option(None, help="Text file of class names, one per line."),
    like: Optional[str] = typer.Option(None, help="(a file or URL) Another split's manifest (the training one): its classes, and a warning when this split holds fewer."),
) -> None:
    """Write a data manifest for WebDataset shards made elsewhere, checking every sample."""
    from civt_cache.data.writer import ClassesWarning, ShardOrderWarning, scan_shards

    names = classes.read_text().split("\n") if classes else None
    names = [n for n in names if n.strip()] if names else None
    path = data_location(manifest) if manifest else default_manifest_path(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ShardOrderWarning)
        warnings.simplefilter("always", ClassesWarning)
        m = scan_shards(pattern, name, path, names, load_manifest(like) if like else None)
    for w in caught:
        typer.echo(f"civt-cache: warning: {w.message}", err=True)
    typer.echo(f"{path}: {m.num_samples} samples in {len(m.shards)} shards, "
               f"{m.num_classes} classes")


@app.command("cache-teachers")
def cache_teachers_cmd(
    pipeline: Optional[Path] = PIPELINE_OPT,
    manifest: Optional[str] = typer.Option(None, help="(a file or URL) Data manifest of the training shards."),
    teacher: list[str] = typer.Option([], help="NAME=ARCH:CHECKPOINT (repeat), e.g. conv=regnety_006:r.pth"),
    epochs: Optional[int] = typer.Option(None, help="Epochs of views to cache."),
    epochs_per_unit: Optional[int] = typer.Option(None, help="Epochs per unit of work (decode once per unit)."),
    topk: Optional[int] = typer.Option(None, help="Logits kept per view and teacher."),
    img_size: Optional[int] = typer.Option(None, help="View size, overriding [recipe] img_size [224]."),
    seed: Optional[int] = typer.Option(None, help="Seed of the view records."),
    out: Optional[str] = typer.Option(None, help="Cache: a folder, or an s3:// / gs:// prefix (a zarr v3 group)."),
    batch_size: Optional[int] = typer.Option(None, help="Teacher batch size (views are built per pair group of 256 rows, so at most 256)."),
    workers: Optional[int] = typer.Option(None, help="DataLoader workers building views."),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda"),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the teachers."),
    claim: Optional[bool] = typer.Option(None, "--claim/--static", help="Take units one at a time under leases, shared with any other process on this cache (several nodes, job arrays), instead of a static split over torchrun ranks."),
    lease_seconds: Optional[float] = typer.Option(None, help="With --claim: seconds a unit's lease lasts unless renewed; a crashed process's units are taken over after it."),
    repair: Optional[bool] = typer.Option(None, "--repair/--no-repair", help="First check every committed unit's checksums and recompute the damaged ones."),
) -> None:
    """Stage one: run the teachers once over the augmented views; store top-k + view records."""
    from civt_cache.config import build_config, load_pipeline
    from civt_cache.stages.cache_teachers import CacheJob, cache_teachers

    cfg = load_pipeline(pipeline)
    job = build_config(CacheJob, cfg, "cache", dict(
        manifest=manifest, teachers=teacher, epochs=epochs, epochs_per_unit=epochs_per_unit,
        topk=topk, img_size=img_size, seed=seed, out=out, batch_size=batch_size, workers=workers,
        threads=threads, device=device, compile=compile, claim=claim, lease_seconds=lease_seconds, repair=repair), pipeline)
    summary = cache_teachers(job)
    typer.echo(f"rank {summary['rank']}: {summary['units']} unit(s), {summary['views']} views in "
               f"{summary['seconds']:.1f}s ({summary['views_per_s']:.0f} views/s) -> {job.out}")


def _cache_dir(cache: Optional[str], pipeline: Optional[Path]) -> str | Path:
    from civt_cache.cache.objects import cache_location
    from civt_cache.config import load_pipeline, need, setting

    return cache_location(need(setting(load_pipeline(pipeline), "cache.out", cache, str, pipeline),
                               "CACHE", "[cache] out"))


@app.command("inspect")
def inspect_cmd(cache: Optional[str] = typer.Argument(None, help="Cache: folder or s3:// / gs:// prefix [[cache] out]."),
                pipeline: Optional[Path] = PIPELINE_OPT) -> None:
    """Teachers, epochs, completed units, bytes per view, teacher agreement, what is missing."""
    from civt_cache.stages.verify import inspect_cache

    typer.echo(inspect_cache(_cache_dir(cache, pipeline)))


@app.command("verify")
def verify_cmd(
    cache: Optional[str] = typer.Argument(None, help="Cache: folder or s3:// / gs:// prefix [[cache] out]."),
    pipeline: Optional[Path] = PIPELINE_OPT,
    manifest: Optional[str] = typer.Option(None, help="(a file or URL) Data manifest [the one the cache recorded]."),
    teacher: list[str] = typer.Option([], help="NAME=ARCH:CHECKPOINT for a cached teacher whose file moved [recorded path]."),
    samples: int = typer.Option(32, min=1, help="Random (epoch, row) views to rebuild and rerun."),
    seed: int = typer.Option(0, help="Seed of the sample choice."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    full: bool = typer.Option(False, "--full", help="Instead: check every committed unit's checksums (no teachers run) and that every unit is committed; list damaged and missing units."),
) -> None:
    """Rebuild random views from their records, rerun the teachers, compare with the cache
    (or, with --full, check every committed unit for damage)."""
    from civt_cache.stages.verify import verify_cache, verify_full

    cache = _cache_dir(cache, pipeline)
    report, ok = verify_full(cache) if full else verify_cache(cache, manifest, teacher, samples, seed, device)
    typer.echo(report)
    if not ok:
        raise typer.Exit(1)


@app.command("train-student")
def train_student_cmd(
    pipeline: Optional[Path] = PIPELINE_OPT,
    manifest: Optional[str] = typer.Option(None, help="(a file or URL) Training data manifest."),
    val_manifest: Optional[str] = typer.Option(None, help="(a file or URL) Validation data manifest."),
    cache: Optional[str] = typer.Option(None, help="Teacher cache from cache-teachers (folder or s3:// / gs:// prefix)."),
    model: Optional[str] = typer.Option(None, help="Student: civt_micro | civt_tiny | civt_small | civt_base."),
    img_size: Optional[int] = typer.Option(None, help="View size, overriding [recipe] img_size; must match the cache's [224]."),
    epochs: Optional[int] = typer.Option(None, help="Training epochs (at most the cached ones unless --cycle-cache)."),
    teachers: Optional[str] = typer.Option(None, help="both | conv | inv | none (ablations)."),
    online: Optional[bool] = typer.Option(None, "--online/--cached", help="Run the teachers live instead of reading the cache."),
    teacher: list[str] = typer.Option([], help="NAME=ARCH:CKPT: live teachers (--online) or a check of the cached ones."),
    seed: Optional[int] = typer.Option(None, help="The student's seed: initialisation, drop path, data order."),
    view_seed: Optional[int] = typer.Option(None, help="Seed of the views without a cache [--seed]; a cache replays its own."),
    cycle_cache: Optional[bool] = typer.Option(None, "--cycle-cache/--no-cycle-cache", help="Allow more epochs than cached by replaying cached epochs."),
    batch_size: Optional[int] = typer.Option(None, help="Per-rank batch size."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate [5e-4 x global batch / 512]."),
    temperature: Optional[float] = typer.Option(None, help="Distillation temperature T."),
    renormalize: Optional[bool] = typer.Option(None, "--renormalize/--spread-rest", help="Top-k targets renormalised, or the remaining mass spread over other classes."),
    workers: Optional[int] = typer.Option(None, help="DataLoader workers."),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda"),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the student."),
    checkpoint_every: Optional[int] = typer.Option(None, help="Also checkpoint every N steps."),
    log_every: Optional[int] = typer.Option(None, help="Steps between reads of the loss from the device (progress, NaN check) [20]."),
    prefetch: Optional[bool] = typer.Option(None, "--prefetch/--no-prefetch", help="Build the next batch while the current one trains [on]."),
    model_ema: Optional[bool] = typer.Option(None, "--model-ema/--no-model-ema", help="Keep and evaluate an EMA of the weights (timm's ModelEmaV3)."),
    model_ema_decay: Optional[float] = typer.Option(None, help="EMA decay per step [0.9998]."),
    log: Optional[str] = typer.Option(None, help="'tensorboard': also log each epoch's metrics to RUN/tb."),
    out: Optional[Path] = typer.Option(None, help="Run directory (checkpoints, metrics, plot)."),
    resume: Optional[bool] = typer.Option(None, "--resume/--fresh", help="Continue from RUN_DIR/checkpoint.pt."),
    force: Optional[bool] = typer.Option(None, "--force/--no-force", help="Start fresh in a folder holding another run's files, replacing them."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many steps in all."),
) -> None:
    """Stage two: train a CivT student from images plus the cached soft targets."""
    from civt_cache.config import build_config, load_pipeline
    from civt_cache.stages.train_student import StudentJob, train_student

    cfg = load_pipeline(pipeline)
    job = build_config(StudentJob, cfg, "student", dict(
        manifest=manifest, val_manifest=val_manifest, cache=cache, model=model, img_size=img_size,
        epochs=epochs, teachers=teachers, online=online, teacher=teacher, seed=seed,
        view_seed=view_seed, cycle_cache=cycle_cache, batch_size=batch_size, lr=lr, temperature=temperature, renormalize=renormalize,
        workers=workers, threads=threads, device=device, compile=compile, checkpoint_every=checkpoint_every, log_every=log_every, prefetch=prefetch,
        model_ema=model_ema, model_ema_decay=model_ema_decay, log=log,
        out=out, resume=resume, force=force, max_steps=max_steps), pipeline)
    res = train_student(job)
    if "results_file" in res:  # rank 0, which wrote it
        typer.echo(f"val top-1 {res.get('val_top1', float('nan')):.2f}% -> {res['results_file']}")
    elif "stopped_at" in res and res.get("rank", 0) == 0:
        at = res["stopped_at"]
        typer.echo(f"stopped by --max-steps at epoch {at['epoch'] + 1} step {at['step']}; "
                   f"--resume continues from {res['checkpoint']}")


@app.command("train-teacher")
def train_teacher_cmd(
    pipeline: Optional[Path] = PIPELINE_OPT,
    name: Optional[str] = typer.Option(None, help="The pipeline's [teachers.NAME] table to train (arch, checkpoint, epochs, ...)."),
    manifest: Optional[str] = typer.Option(None, help="(a file or URL) Training data manifest [[student] manifest]."),
    val_manifest: Optional[str] = typer.Option(None, help="(a file or URL) Validation data manifest [[student] val_manifest]."),
    arch: Optional[str] = typer.Option(None, help="timm architecture (e.g. resnet18, regnety_006, rednet26)."),
    epochs: Optional[int] = typer.Option(None, help="Epochs [30]."),
    img_size: Optional[int] = typer.Option(None, help="Training image size [[recipe] img_size, or 224]."),
    out: Optional[Path] = typer.Option(None, help="Checkpoint path (.pth) [[teachers.NAME] checkpoint]."),
    seed: Optional[int] = typer.Option(None, help="Seed [0]."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size [128]."),
    opt: Optional[str] = typer.Option(None, help="adamw | sgd [adamw]."),
    lr: Optional[float] = typer.Option(None, help="Peak LR [adamw 1e-3, sgd 0.1, x batch/256]."),
    workers: Optional[int] = typer.Option(None, help="DataLoader workers [2]."),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda [auto]."),
) -> None:
    """Train a teacher and write a checkpoint (+ its sha256)."""
    from civt_cache.config import build_config, load_pipeline
    from civt_cache.stages.train_teacher import TeacherJob, train_teacher

    cfg, section, table = load_pipeline(pipeline), "train-teacher", {}
    if name is not None:
        section = f"teachers.{name}"
        table = dict(need_table(cfg, "teachers", name, pipeline))
        if "checkpoint" in table:
            table["out"] = table.pop("checkpoint")
    student, recipe = cfg.get("student", {}), cfg.get("recipe", {})
    table = {**{k: student[k] for k in ("manifest", "val_manifest") if k in student},
             **({"img_size": recipe["img_size"]} if "img_size" in recipe else {}), **table}
    job = build_config(TeacherJob, {section: table}, section, dict(
        manifest=manifest, val_manifest=val_manifest, arch=arch, out=out, epochs=epochs,
        img_size=img_size, seed=seed, batch_size=batch_size, opt=opt, lr=lr, workers=workers,
        device=device, threads=threads), pipeline)
    res = train_teacher(job)
    typer.echo(f"{job.arch}: val top-1 {res['val_top1']:.2f}% top-5 {res['val_top5']:.2f}% in "
               f"{res['train_seconds']:.0f}s -> {job.out} (sha256 {res['sha256'][:16]})")


def need_table(cfg: dict, group: str, name: str, pipeline: Optional[Path]) -> dict:
    """The pipeline's [GROUP.NAME] table, or a refusal naming the ones it has."""
    from civt_cache.errors import ConfigError

    tables = cfg.get(group, {})
    if name not in tables:
        raise ConfigError(f"{pipeline or 'no --pipeline'}: no [{group}.{name}] table "
                          f"(has {sorted(tables) or 'none'})")
    return tables[name]


@app.command("eval")
def eval_cmd(
    pipeline: Optional[Path] = PIPELINE_OPT,
    name: Optional[str] = typer.Option(None, help="Evaluate the pipeline's [teachers.NAME] checkpoint [the student's model_best.pt]."),
    manifest: Optional[str] = typer.Option(None, help="(a file or URL) Validation data manifest [[student] val_manifest]."),
    arch: Optional[str] = typer.Option(None, help="Architecture of the checkpoint."),
    checkpoint: Optional[Path] = typer.Option(None, help="Checkpoint file."),
    img_size: Optional[int] = typer.Option(None, help="Image size [[recipe] img_size, else the checkpoint's]."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    json_out: bool = typer.Option(False, "--json", help="Print the metrics as one JSON object."),
) -> None:
    """Top-1/top-5 of a checkpoint (for CivT: each head and their mean)."""
    import json

    from civt_cache.config import load_pipeline, need, setting
    from civt_cache.train.evaluate import evaluate_checkpoint

    cfg = load_pipeline(pipeline)
    if name is not None:
        table = need_table(cfg, "teachers", name, pipeline)
        arch, checkpoint = arch or table.get("arch"), checkpoint or table.get("checkpoint")
    elif pipeline is not None:
        student = cfg.get("student", {})
        arch = arch or student.get("model")
        if checkpoint is None and "out" in student:
            checkpoint = Path(student["out"]) / "model_best.pt"
    manifest = data_location(need(setting(cfg, "student.val_manifest", manifest, str, pipeline), "--manifest",
                                  "[student] val_manifest"))
    metrics = evaluate_checkpoint(manifest, need(arch, "--arch", "[teachers.NAME] arch or [student] model"),
                                  Path(need(checkpoint, "--checkpoint", "[teachers.NAME] checkpoint or [student] out")),
                                  img_size if img_size is not None else setting(cfg, "recipe.img_size", None, int, pipeline),
                                  device)
    if json_out:
        typer.echo(json.dumps(metrics))
        return
    for k, v in metrics.items():
        typer.echo(f"{k}: {v:.2f}")


def _defaults_in_help(command: object, job: type) -> None:
    """Show each setting's default (the job dataclass's) in ``--help``: the options default to
    None so that a pipeline file can set them, which would otherwise hide the real default."""
    import dataclasses
    import inspect

    fields = {f.name: f for f in dataclasses.fields(job)}  # type: ignore[arg-type]
    for name, param in inspect.signature(command).parameters.items():  # type: ignore[arg-type]
        info, f = param.default, fields.get(name)
        if not isinstance(info, typer.models.OptionInfo) or f is None or not info.help or "[" in info.help:
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING and \
            f.default_factory is not dataclasses.MISSING else f.default
        if default is not dataclasses.MISSING and default not in (None, [], ""):
            info.help = f"{info.help} [{default}]"


def _print_version(value: bool) -> None:
    if value:
        from civt_cache import __version__

        typer.echo(f"civt-cache {__version__}")
        raise typer.Exit()


def _show_job_defaults() -> None:
    from civt_cache.stages.cache_teachers import CacheJob
    from civt_cache.stages.train_student import StudentJob

    _defaults_in_help(cache_teachers_cmd, CacheJob)
    _defaults_in_help(train_student_cmd, StudentJob)


@app.callback()
def _options(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks (or set CIVT_DEBUG=1)."),
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                 help="Print the version and exit."),
    max_image_pixels: Optional[int] = typer.Option(
        None, min=1, help="Largest width x height an input image may declare; larger ones are refused "
        "by name before decoding [CIVT_MAX_IMAGE_PIXELS, or 89,478,485]."),
    decode_budget: Optional[int] = typer.Option(
        None, min=1, help="Decoded pixels one decode pass may hold, whatever the image count "
        "[CIVT_DECODE_BUDGET_PIXELS, or 64 Mpx on CPU, 1/64 of a GPU's memory]."),
) -> None:
    """Options of every command. The limits travel as environment variables, so loader
    workers and torchrun ranks started by this process keep them."""
    from civt_cache.data.imageio import MAX_PIXELS_ENV
    from civt_cache.views.engine import BUDGET_ENV

    if debug:
        os.environ["CIVT_DEBUG"] = "1"
    if max_image_pixels is not None:
        os.environ[MAX_PIXELS_ENV] = str(max_image_pixels)
    if decode_budget is not None:
        os.environ[BUDGET_ENV] = str(decode_budget)


def main() -> None:
    """Entry point: a user's mistake or a failing disk becomes one line naming the file and the
    problem, exit code 2; ``--debug`` / ``CIVT_DEBUG=1`` keep the traceback."""
    import sys

    from civt_cache.config import refuse_misplaced_urls
    from civt_cache.errors import one_line_error

    if "--help" in sys.argv[1:]:
        _show_job_defaults()
    try:
        refuse_misplaced_urls(sys.argv[1:])
        app(standalone_mode=True)
    except Exception as e:  # pragma: no cover - exercised through subprocess tests
        line = one_line_error(e)
        if line is None or os.environ.get("CIVT_DEBUG"):
            raise
        typer.echo(f"civt-cache: error: {line}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
