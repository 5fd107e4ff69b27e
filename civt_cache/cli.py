"""The ``civt-cache`` command line. Each command is a thin shell over a library function."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .manifest import default_manifest_path

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Cache co-advise teachers once; train CivT students from the cache.")


@app.command("make-shards")
def make_shards_cmd(
    src: str = typer.Argument(..., help="ImageFolder root (one folder per class) or 'digits'."),
    out_dir: Path = typer.Argument(..., help="Folder for the .tar shards."),
    name: str = typer.Option(..., help="Dataset name; shards are NAME-000000.tar ..."),
    shard_size: int = typer.Option(1000, help="Samples per shard."),
    manifest: Optional[Path] = typer.Option(None, help="Manifest path [data_manifests/NAME.json]."),
    seed: int = typer.Option(0, help="Seed of the shuffle across shards."),
    skip_bad: bool = typer.Option(False, help="Record undecodable files under 'skipped' and go on."),
    workers: int = typer.Option(0, help="Encoding processes [min(8, cores)]."),
) -> None:
    """Write WebDataset shards (KEY.jpg + KEY.cls) and their data manifest."""
    from .shard_writer import image_folder_items, write_shards

    if src == "digits":
        from .digits import digits_items

        for split, (classes, items) in digits_items().items():
            split_name = f"{name}-{split}"
            path = (manifest.parent / f"{manifest.stem}-{split}.json" if manifest
                    else default_manifest_path(split_name))
            m = write_shards(items, classes, out_dir, split_name, shard_size, seed,
                             "sklearn.datasets.load_digits (32x32 RGB)", path, skip_bad, workers)
            typer.echo(f"{path}: {m.num_samples} samples in {len(m.shards)} shards")
        return
    classes, items = image_folder_items(Path(src))
    path = manifest or default_manifest_path(name)
    m = write_shards(items, classes, out_dir, name, shard_size, seed, f"imagefolder:{src}", path,
                     skip_bad, workers)
    typer.echo(f"{path}: {m.num_samples} samples in {len(m.shards)} shards, "
               f"{len(m.skipped)} skipped")


@app.command("scan-shards")
def scan_shards_cmd(
    pattern: str = typer.Argument(..., help="Directory, brace pattern or glob of .tar shards."),
    name: str = typer.Option(..., help="Dataset name."),
    manifest: Optional[Path] = typer.Option(None, help="Manifest path [data_manifests/NAME.json]."),
    classes: Optional[Path] = typer.Option(None, help="Text file of class names, one per line."),
) -> None:
    """Write a data manifest for WebDataset shards made elsewhere, checking every sample."""
    from .shard_writer import scan_shards

    names = classes.read_text().split("\n") if classes else None
    names = [n for n in names if n.strip()] if names else None
    path = manifest or default_manifest_path(name)
    m = scan_shards(pattern, name, path, names)
    typer.echo(f"{path}: {m.num_samples} samples in {len(m.shards)} shards, "
               f"{m.num_classes} classes")


PIPELINE_OPT = typer.Option(None, "--pipeline", help="Pipeline TOML; flags override it.")


@app.command("cache-teachers")
def cache_teachers_cmd(
    pipeline: Optional[Path] = PIPELINE_OPT,
    manifest: Optional[Path] = typer.Option(None, help="Data manifest of the training shards."),
    teacher: list[str] = typer.Option([], help="NAME=ARCH:CHECKPOINT (repeat), e.g. conv=regnety_006:r.pth"),
    epochs: Optional[int] = typer.Option(None, help="Epochs of views to cache."),
    epochs_per_unit: Optional[int] = typer.Option(None, help="Epochs per unit of work (decode once per unit)."),
    topk: Optional[int] = typer.Option(None, help="Logits kept per view and teacher."),
    img_size: Optional[int] = typer.Option(None, help="View size (overrides [recipe] img_size)."),
    seed: Optional[int] = typer.Option(None, help="Seed of the view records."),
    out: Optional[Path] = typer.Option(None, help="Cache directory (zarr v3 group)."),
    batch_size: Optional[int] = typer.Option(None, help="Teacher batch size."),
    workers: Optional[int] = typer.Option(None, help="DataLoader workers building views."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda"),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the teachers."),
    claim: Optional[bool] = typer.Option(None, "--claim/--static", help="Claim units with files (multi-node) instead of a static split."),
    run_id: Optional[str] = typer.Option(None, help="Claim namespace shared by all nodes of one run."),
) -> None:
    """Stage one: run the teachers once over the augmented views; store top-k + view records."""
    from .pipeline import build_config, load_pipeline
    from .stage1 import CacheJob, cache_teachers

    cfg = load_pipeline(pipeline)
    job = build_config(CacheJob, cfg, "cache", dict(
        manifest=manifest, teachers=teacher, epochs=epochs, epochs_per_unit=epochs_per_unit,
        topk=topk, img_size=img_size, seed=seed, out=out, batch_size=batch_size, workers=workers,
        device=device, compile=compile, claim=claim, run_id=run_id), pipeline)
    summary = cache_teachers(job)
    typer.echo(f"rank {summary['rank']}: {summary['units']} unit(s), {summary['views']} views in "
               f"{summary['seconds']:.1f}s ({summary['views_per_s']:.0f} views/s) -> {job.out}")


@app.command("inspect")
def inspect_cmd(cache: Path = typer.Argument(..., help="Cache directory.")) -> None:
    """Teachers, epochs, completed units, bytes per view, teacher agreement, what is missing."""
    from .cache_tools import inspect_cache

    typer.echo(inspect_cache(cache))


@app.command("verify")
def verify_cmd(
    cache: Path = typer.Argument(..., help="Cache directory."),
    manifest: Path = typer.Option(..., help="Data manifest the cache was built from."),
    teacher: list[str] = typer.Option(..., help="NAME=ARCH:CHECKPOINT of the cached teachers."),
    samples: int = typer.Option(32, help="Random (epoch, row) views to rebuild and rerun."),
    seed: int = typer.Option(0, help="Seed of the sample choice."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
) -> None:
    """Rebuild random views from their records, rerun the teachers, compare with the cache."""
    from .cache_tools import verify_cache

    report, ok = verify_cache(cache, manifest, teacher, samples, seed, device)
    typer.echo(report)
    if not ok:
        raise typer.Exit(1)


def main() -> None:
    """Entry point: library errors become one clear line and exit code 2, not a traceback."""
    from .errors import USER_ERRORS

    try:
        app(standalone_mode=True)
    except USER_ERRORS as e:  # pragma: no cover - exercised through subprocess tests
        typer.echo(f"civt-cache: error: {e}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
