"""The ``civt-cache`` command line. Each command is a thin shell over a library function."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional

import typer

from civt_cache.bench.cli import bench_app
from civt_cache.cli_options import PIPELINE_OPT, THREADS_HELP, class_names, defaults_in_help
from civt_cache.cli_train import eval_cmd, train_student_cmd, train_teacher_cmd
from civt_cache.data.manifest import data_location, default_manifest_path, load_manifest

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,  # help texts show [defaults] literally
                  help="Cache co-advise teachers once; train CivT students from the cache.")
app.add_typer(bench_app, name="bench")


DATA_KEYS = frozenset({"src", "shards", "name", "shard_size", "manifest", "seed", "skip_bad", "workers",
                       "max_memory_mb", "spool_dir", "classes"})


@app.command("make-shards")
def make_shards_cmd(
    src: Optional[str] = typer.Argument(None, help="ImageFolder root (one folder per class), a data manifest (.json: its shards rewritten shuffled), or a built-in source: 'digits' (10 classes) or 'digit-pairs' (100) [[data] src]."),
    out_dir: Optional[str] = typer.Argument(None, help="Folder (or s3:// / gs:// prefix) for the .tar shards [[data] shards]."),
    pipeline: Optional[Path] = PIPELINE_OPT,
    name: Optional[str] = typer.Option(None, help="Dataset name; shards are NAME-000000.tar ... [[data] name]."),
    shard_size: Optional[int] = typer.Option(None, help="Samples per shard [1000]."),
    manifest: Optional[str] = typer.Option(None, help="(a file or URL) Manifest path [data_manifests/NAME.json]."),
    seed: Optional[int] = typer.Option(None, help="Seed of the shuffle across shards [0]."),
    skip_bad: Optional[bool] = typer.Option(None, "--skip-bad/--no-skip-bad", help="Record undecodable files under 'skipped' and go on [off]."),
    workers: Optional[int] = typer.Option(None, help="Encoding processes [0: min(8, cores)]."),
    max_memory_mb: Optional[int] = typer.Option(None, help="Memory bound: images in flight to the encoders, and rewriting a manifest's shards (a shard is read whole: at least twice the largest) [2048]."),
    spool_dir: Optional[Path] = typer.Option(None, help="Where rewriting a manifest's shards spools the data's size on disk for the shuffle [OUT_DIR; a bucket's: the temp folder]."),
    classes: Optional[Path] = typer.Option(None, help="Class names file, one per line: the classes and their order for an image folder (its folders must be among them), so every split numbers them alike [the sorted folder names]."),
) -> None:
    """Write WebDataset shards (KEY.jpg + KEY.cls) and their data manifest (shuffled)."""
    import tempfile

    from civt_cache.config import load_pipeline, need, setting
    from civt_cache.data.digits import BUILT_IN
    from civt_cache.data.reshard import ShuffleSpool
    from civt_cache.data.writer import DEFAULT_MAX_MEMORY_MB, image_folder_items, write_shards, write_stream
    from civt_cache.errors import ConfigError
    from civt_cache.data.remote import REMOTE_SCHEMES
    from civt_cache.fsutil import refuse_url

    cfg = load_pipeline(pipeline)
    unknown = set(cfg.get("data", {})) - DATA_KEYS
    if unknown:
        raise ConfigError(f"{pipeline}: [data] has unknown keys {sorted(unknown)}; known: {sorted(DATA_KEYS)}")
    src = need(setting(cfg, "data.src", src, str, pipeline), "SRC", "[data] src")
    refuse_url(src, "SRC", REMOTE_SCHEMES if src.endswith(".json") else ())
    out_dir = data_location(need(setting(cfg, "data.shards", out_dir, str, pipeline), "OUT_DIR", "[data] shards"))
    name = need(setting(cfg, "data.name", name, str, pipeline), "--name", "[data] name")
    shard_size = setting(cfg, "data.shard_size", shard_size, int, pipeline, 1000)
    manifest = setting(cfg, "data.manifest", manifest, str, pipeline)
    seed = setting(cfg, "data.seed", seed, int, pipeline, 0)
    skip_bad = setting(cfg, "data.skip_bad", skip_bad, bool, pipeline, False)
    workers = setting(cfg, "data.workers", workers, int, pipeline, 0)
    max_memory_mb = setting(cfg, "data.max_memory_mb", max_memory_mb, int, pipeline, DEFAULT_MAX_MEMORY_MB)
    spool_dir = setting(cfg, "data.spool_dir", spool_dir, Path, pipeline)
    names = class_names(setting(cfg, "data.classes", classes, Path, pipeline))
    if names is not None and (src in BUILT_IN or src.endswith(".json")):
        raise ConfigError(f"make-shards {src}: --classes orders an image folder's classes; "
                          + (f"{src} has its own" if src in BUILT_IN else "a manifest's shards keep its classes"))
    if max_memory_mb < 1:
        raise ConfigError(f"make-shards: --max-memory-mb {max_memory_mb}: must be >= 1")
    if src in BUILT_IN:
        splits, origin = BUILT_IN[src]
        for split, (classes, items) in splits().items():
            split_name = f"{name}-{split}"
            path = (data_location(f"{manifest.removesuffix('.json')}-{split}.json") if manifest
                    else default_manifest_path(split_name))
            m = write_shards(items, classes, out_dir, split_name, shard_size, seed, origin, path, skip_bad, workers)
            typer.echo(f"{path}: {m.num_samples} samples in {len(m.shards)} shards")
        return
    path = data_location(manifest) if manifest else default_manifest_path(name)
    if src.endswith(".json"):  # shards made elsewhere, e.g. sorted by class: rewritten shuffled
        source = load_manifest(src)
        spool = spool_dir or (out_dir if isinstance(out_dir, Path) else Path(tempfile.gettempdir()))
        with ShuffleSpool(source, seed, max_memory_mb, spool) as shuffled:
            m = write_stream(shuffled.items(), shuffled.total, source.classes, out_dir, name, shard_size, seed,
                             f"manifest:{src}", path, skip_bad, workers, max_memory_mb)
    else:
        folder_classes, items = image_folder_items(Path(src), names)
        m = write_shards(items, folder_classes, out_dir, name, shard_size, seed, f"imagefolder:{src}", path,
                         skip_bad, workers, max_memory_mb)
    typer.echo(f"{path}: {m.num_samples} samples in {len(m.shards)} shards, "
               f"{len(m.skipped)} skipped")


@app.command("scan-shards")
def scan_shards_cmd(
    pattern: str = typer.Argument(..., help="Directory, brace pattern or glob of .tar (or .tar.gz) shards; or their s3://, gs://, https:// or file:// URLs, or pipe:COMMAND (with CIVT_ALLOW_PIPE=1)."),
    name: str = typer.Option(..., help="Dataset name."),
    manifest: Optional[str] = typer.Option(None, help="(a file or URL) Manifest path [data_manifests/NAME.json]."),
    classes: Optional[Path] = typer.Option(None, help="Text file of class names, one per line."),
    like: Optional[str] = typer.Option(None, help="(a file or URL) Another split's manifest (the training one): its classes, and a warning when this split holds fewer."),
    label_key: str = typer.Option("cls", help="Where the label is (an integer, or a class name of --classes): cls | txt | json:FIELD (a field of each sample's .json; json:meta.label one inside another)."),
) -> None:
    """Write a data manifest for WebDataset shards made elsewhere, checking every sample."""
    from civt_cache.data.scan import ClassesWarning, ShardOrderWarning, scan_shards

    names = class_names(classes)
    path = data_location(manifest) if manifest else default_manifest_path(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ShardOrderWarning)
        warnings.simplefilter("always", ClassesWarning)
        m = scan_shards(pattern, name, path, names, load_manifest(like) if like else None, label_key)
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
    allow_sorted_shards: Optional[bool] = typer.Option(None, "--allow-sorted-shards", help="Cache shards whose label spread shows them sorted by class, deliberately (refused otherwise)."),
) -> None:
    """Stage one: run the teachers once over the augmented views; store top-k + view records."""
    from civt_cache.config import build_config, load_pipeline
    from civt_cache.stages.cache_teachers import CacheJob, cache_teachers

    cfg = load_pipeline(pipeline)
    job = build_config(CacheJob, cfg, "cache", dict(
        manifest=manifest, teachers=teacher, epochs=epochs, epochs_per_unit=epochs_per_unit,
        topk=topk, img_size=img_size, seed=seed, out=out, batch_size=batch_size, workers=workers,
        threads=threads, device=device, compile=compile, claim=claim, lease_seconds=lease_seconds, repair=repair,
        allow_sorted_shards=allow_sorted_shards), pipeline)
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
    if full:
        report, ok = verify_full(cache)
    else:
        checked = verify_cache(cache, manifest, teacher, samples, seed, device)
        report, ok = checked.report, checked.ok
    typer.echo(report)
    if not ok:
        raise typer.Exit(1)


app.command("train-student")(train_student_cmd)
app.command("train-teacher")(train_teacher_cmd)
app.command("eval")(eval_cmd)


def _print_version(value: bool) -> None:
    if value:
        from civt_cache import __version__

        typer.echo(f"civt-cache {__version__}")
        raise typer.Exit()


def _show_job_defaults() -> None:
    from civt_cache.stages.cache_teachers import CacheJob
    from civt_cache.stages.train_student import StudentJob

    defaults_in_help(cache_teachers_cmd, CacheJob)
    defaults_in_help(train_student_cmd, StudentJob)


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
    from civt_cache.stopping import Stopped, catch_stop_signals, kept_line

    if "--help" in sys.argv[1:]:
        _show_job_defaults()
    sys.argv[1:] = resume_as_timm_types_it(sys.argv[1:])
    catch_stop_signals()
    try:
        refuse_misplaced_urls(sys.argv[1:])
        app(standalone_mode=True)
    except Stopped as stop:  # Ctrl-C or SIGTERM: what is kept, and what continues
        line = kept_line()
        if line:
            typer.echo(f"civt-cache: stopped by {stop}: {line}", err=True)
        raise SystemExit(128 + stop.signum) from None
    except Exception as e:  # pragma: no cover - exercised through subprocess tests
        line = one_line_error(e)
        if line is None or os.environ.get("CIVT_DEBUG"):
            raise
        typer.echo(f"civt-cache: error: {line}{_restart_note()}", err=True)
        raise SystemExit(2) from None


def resume_as_timm_types_it(args: list[str]) -> list[str]:
    """``--resume PATH`` / ``--resume=PATH`` (timm's) as ``--resume --resume-path PATH``: the
    switch and its optional value, which a typer option cannot be at once. A token after
    ``--resume`` is its path unless it is a flag (the commands that resume take no arguments)."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--resume="):
            out += ["--resume", "--resume-path", arg.split("=", 1)[1]]
        elif arg == "--resume" and i + 1 < len(args) and not args[i + 1].startswith("-"):
            out += ["--resume", "--resume-path", args[i + 1]]
            i += 1
        else:
            out.append(arg)
        i += 1
    return out


def _restart_note() -> str:
    """What a refusal adds under torchrun's restarts: torchrun restarts a group whose rank
    exited non-zero, refusals included, and each restart meets the same refusal; it says so
    once, so a log of four identical lines reads as one refusal, not four failures."""
    from civt_cache.distributed import torchrun_restart

    restart = torchrun_restart()
    return (f" (torchrun restart {restart}: the same refusal again; it stays refused, and torchrun "
            "ends once its --max-restarts are spent)") if restart else ""


if __name__ == "__main__":
    main()
