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
