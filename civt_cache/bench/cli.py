"""``civt-cache bench ...``: the benchmark commands, each a thin shell over ``bench*.py``."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

bench_app = typer.Typer(help="Throughput benchmarks that print ratios measured side by side.")


@bench_app.command("views")
def bench_views_cmd(samples: int = typer.Option(128, help="Synthetic ImageNet-shaped JPEGs."),
                    img_size: int = typer.Option(224, help="View size."),
                    batch: int = typer.Option(64, help="Engine batch size."),
                    device: str = typer.Option("auto", help="auto | cpu | cuda (the GPU row)"),
                    repeats: int = typer.Option(5, help="Timed runs of each path; the best counts.")) -> None:
    """View engine vs the PIL path, views/s per CPU core (and on the GPU)."""
    from civt_cache.bench.views import bench_views

    typer.echo(bench_views(samples, img_size, batch, device, repeats))


@bench_app.command("cache")
def bench_cache_cmd(pipeline: Path = typer.Option(Path("pipelines/demo.toml"), "--pipeline"),
                    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda")) -> None:
    """Stage one: full pipeline views/s vs teacher-only views/s, and bytes per view."""
    from civt_cache.bench.cache import bench_cache
    from civt_cache.config import build_config, load_pipeline
    from civt_cache.stages.cache_teachers import CacheJob

    job = build_config(CacheJob, load_pipeline(pipeline), "cache", {"device": device}, pipeline)
    typer.echo(bench_cache(job))


@bench_app.command("student")
def bench_student_cmd(pipeline: Path = typer.Option(Path("pipelines/demo.toml"), "--pipeline"),
                      steps: int = typer.Option(12, help="Timed steps per mode (runs stop inside the first epoch)."),
                      device: Optional[str] = typer.Option(None, help="auto | cpu | cuda")) -> None:
    """Stage two: from-cache vs plain vs online training img/s."""
    from civt_cache.bench.student import bench_student
    from civt_cache.config import build_config, load_pipeline
    from civt_cache.stages.train_student import StudentJob

    cfg = load_pipeline(pipeline)
    job = build_config(StudentJob, cfg, "student", {"device": device}, pipeline)
    typer.echo(bench_student(job, cfg.get("cache", {}).get("teachers", []), steps))


@bench_app.command("threads")
def bench_threads_cmd(pipeline: Path = typer.Option(Path("pipelines/demo.toml"), "--pipeline"),
                      steps: int = typer.Option(12, help="Timed steps per setting (runs stop inside the first epoch)."),
                      device: Optional[str] = typer.Option(None, help="auto | cpu | cuda")) -> None:
    """Training img/s at civt-cache's thread choice vs 1 thread vs torch's default, idle and
    beside a busy core."""
    from civt_cache.bench.threads import bench_threads
    from civt_cache.config import build_config, load_pipeline
    from civt_cache.stages.train_student import StudentJob

    job = build_config(StudentJob, load_pipeline(pipeline), "student", {"device": device}, pipeline)
    typer.echo(bench_threads(job, steps))


@bench_app.command("imagenet")
def bench_imagenet_cmd(
    samples: int = typer.Option(256, help="Synthetic ImageNet-shaped images (shards of 1,250)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    workers: int = typer.Option(2, help="DataLoader workers of both stages."),
    teacher_batch: int = typer.Option(64, help="Stage one batch size."),
    student_batch: int = typer.Option(16, help="Stage two batch size."),
    steps: int = typer.Option(8, help="Timed student steps per mode."),
    online: bool = typer.Option(True, "--online/--no-online", help="Also time online co-advising."),
) -> None:
    """Both stages at 224 px on synthetic ImageNet-shaped shards with the paper's teachers."""
    from civt_cache.bench.imagenet import bench_imagenet

    typer.echo(bench_imagenet(samples, device, workers, teacher_batch, student_batch, steps, online))


@bench_app.command("requests")
def bench_requests_cmd(cache: str = typer.Argument(..., help="An s3:// cache.")) -> None:
    """Objects per unit, start-up requests and the bytes one epoch reads, of an s3:// cache."""
    from civt_cache.bench.requests import bench_requests

    typer.echo(bench_requests(cache))


@bench_app.command("unit-memory")
def bench_unit_memory_cmd(epochs_per_unit: list[int] = typer.Option([1, 10, 30], help="Epochs per unit to measure (repeat)."),
                          samples: int = typer.Option(256, help="ImageNet-shaped JPEGs (one pair group: 256)."),
                          img_size: int = typer.Option(224, help="View size.")) -> None:
    """Stage one's peak memory against its epochs per unit, at ImageNet's image size."""
    from civt_cache.bench.unit_memory import bench_unit_memory

    typer.echo(bench_unit_memory(epochs_per_unit, samples, img_size))


@bench_app.command("scale")
def bench_scale_cmd(fraction: list[float] = typer.Option([1 / 64, 1 / 16], help="Fractions of ImageNet's counts (repeat), e.g. 0.015625 0.0625 0.25 1."),
                    samples: bool = typer.Option(True, "--samples/--no-samples", help="The sample-count operations (make-shards, scan-shards, resharding, plan)."),
                    units: bool = typer.Option(True, "--units/--no-units", help="The unit-count operations (stage one, inspect, verify, train-student start-up, resume)."),
                    tmp: Optional[Path] = typer.Option(None, help="Folder for the worlds built (a temporary folder in it) [the system's]."),
                    max_growth: float = typer.Option(0.0, help="Exit 1 when an operation's fitted growth exponent exceeds this (0: never)."),
                    repeats: int = typer.Option(1, help="Runs of each operation that changes nothing it reads (scan, plan, rerun, inspect, verify); the fastest counts."),
                    s3: bool = typer.Option(False, "--s3", help="Also the unit world's cache in a local S3 server (moto): 4 processes claiming its units, the start-ups from the bucket, requests counted at the server."),
                    ) -> None:
    """ImageNet's shard, unit and sample counts without its compute: each operation's time and
    peak RSS at each fraction, and its growth exponent."""
    from civt_cache.bench.scale import bench_scale, over_growth

    text, table = bench_scale(fraction, samples, units, tmp, repeats, s3)
    typer.echo(text)
    over = over_growth(table, max_growth) if max_growth else {}
    if over:
        typer.echo(f"growth over {max_growth}: " + "; ".join(f"{op} ({b:.2f})" for op, b in over.items()), err=True)
        raise typer.Exit(1)
