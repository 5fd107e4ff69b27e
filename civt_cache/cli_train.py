"""``train-student``, ``train-teacher`` and ``eval``: thin shells over the training stages.
``train-student`` takes timm's ``train.py`` flag names for the recipe's knobs beside its own
(``-b``, ``-j``, ``--weight-decay``, ``--drop-path``, ``--smoothing``, ``--mixup``, ...), and
``-c/--config`` reads a run's ``args.yaml`` back, as timm's ``-c`` does."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import typer

from civt_cache.cli_options import PIPELINE_OPT, THREADS_HELP, need_table
from civt_cache.data.manifest import data_location


def train_student_cmd(
    pipeline: Optional[Path] = PIPELINE_OPT,
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="A run's args.yaml (timm's -c): its settings, under the pipeline's and the flags."),
    manifest: Optional[str] = typer.Option(None, help="(a file or URL) Training data manifest."),
    val_manifest: Optional[str] = typer.Option(None, help="(a file or URL) Validation data manifest."),
    cache: Optional[str] = typer.Option(None, help="Teacher cache from cache-teachers (folder or s3:// / gs:// prefix)."),
    model: Optional[str] = typer.Option(None, help="Student: civt_micro | civt_tiny | civt_small | civt_base."),
    img_size: Optional[int] = typer.Option(None, help="View size, overriding [recipe] img_size [the cache's; 224 without a cache]."),
    epochs: Optional[int] = typer.Option(None, help="Training epochs (at most the cached ones unless --cycle-cache)."),
    teachers: Optional[str] = typer.Option(None, help="both | conv | inv | none (ablations)."),
    online: Optional[bool] = typer.Option(None, "--online/--cached", help="Run the teachers live instead of reading the cache."),
    teacher: list[str] = typer.Option([], help="NAME=ARCH:CKPT: live teachers (--online) or a check of the cached ones."),
    seed: Optional[int] = typer.Option(None, help="The student's seed: initialisation, drop path, data order."),
    view_seed: Optional[int] = typer.Option(None, help="Seed of the views without a cache [--seed]; a cache replays its own."),
    cycle_cache: Optional[bool] = typer.Option(None, "--cycle-cache/--no-cycle-cache", help="Allow more epochs than cached by replaying cached epochs."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Per-rank batch size."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate [5e-4 x global batch / 512]."),
    min_lr: Optional[float] = typer.Option(None, help="Cosine schedule's floor."),
    warmup_epochs: Optional[float] = typer.Option(None, help="Linear warmup epochs."),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay (not on norms, biases, tokens)."),
    clip_grad: Optional[float] = typer.Option(None, help="Gradient norm clipping (0: off)."),
    smoothing: Optional[float] = typer.Option(None, help="Label smoothing of the CE targets [0.1]."),
    drop_path: Optional[float] = typer.Option(None, help="Stochastic depth rate."),
    aa: Optional[str] = typer.Option(None, help="RandAugment, timm's grammar, e.g. rand-m9-mstd0.5-inc1 ([recipe] randaugment; the cache's must match)."),
    mixup: Optional[float] = typer.Option(None, help="Mixup alpha ([recipe] mixup_alpha)."),
    cutmix: Optional[float] = typer.Option(None, help="CutMix alpha ([recipe] cutmix_alpha)."),
    reprob: Optional[float] = typer.Option(None, help="Random erasing probability ([recipe] erase_prob)."),
    temperature: Optional[float] = typer.Option(None, help="Distillation temperature T."),
    renormalize: Optional[bool] = typer.Option(None, "--renormalize/--spread-rest", help="Top-k targets renormalised, or the remaining mass spread over other classes."),
    workers: Optional[int] = typer.Option(None, "--workers", "-j", help="DataLoader workers."),
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
    output: Optional[Path] = typer.Option(None, help="timm's layout: the run goes to OUTPUT/EXPERIMENT (instead of --out)."),
    experiment: Optional[str] = typer.Option(None, help="Run name under --output [the model's name and the date, as timm's]."),
    resume: Optional[bool] = typer.Option(None, "--resume/--fresh", help="Continue the run in --out from its last.pth.tar, with its own settings (its args.yaml); `--resume PATH` (a run folder or its last.pth.tar) as timm's."),
    resume_path: Optional[Path] = typer.Option(None, "--resume-path", hidden=True, help="What `--resume PATH` becomes (cli.main)."),
    force: Optional[bool] = typer.Option(None, "--force/--no-force", help="Start fresh in a folder holding another run's files, replacing them."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many steps in all."),
    allow_sorted_shards: Optional[bool] = typer.Option(None, "--allow-sorted-shards", help="Train on shards whose label spread shows them sorted by class, deliberately (refused otherwise)."),
) -> None:
    """Stage two: train a CivT student from images plus the cached soft targets."""
    from civt_cache.config import build_config, load_pipeline
    from civt_cache.stages.train_student import StudentJob, train_student

    cfg, out, resume = run_settings(load_pipeline(pipeline), config, out, resume, resume_path)
    flags = {"--aa": ("randaugment", aa), "--mixup": ("mixup_alpha", mixup), "--cutmix": ("cutmix_alpha", cutmix),
             "--reprob": ("erase_prob", reprob), "--img-size": ("img_size", img_size)}
    cfg["recipe"] = recipe_of_the_cache(cfg, {flag: kv for flag, kv in flags.items() if kv[1] is not None},
                                        cache or cfg.get("student", {}).get("cache"), pipeline, config)
    if output is not None:
        out = output / (experiment or f"{time.strftime('%Y%m%d-%H%M%S')}-{model or cfg.get('student', {}).get('model', 'civt')}")
    job = build_config(StudentJob, cfg, "student", dict(
        manifest=manifest, val_manifest=val_manifest, cache=cache, model=model,
        epochs=epochs, teachers=teachers, online=online, teacher=teacher, seed=seed,
        view_seed=view_seed, cycle_cache=cycle_cache, batch_size=batch_size, lr=lr, min_lr=min_lr,
        warmup_epochs=warmup_epochs, weight_decay=weight_decay, clip_grad=clip_grad, label_smoothing=smoothing,
        drop_path=drop_path, temperature=temperature, renormalize=renormalize,
        workers=workers, threads=threads, device=device, compile=compile, checkpoint_every=checkpoint_every, log_every=log_every, prefetch=prefetch,
        model_ema=model_ema, model_ema_decay=model_ema_decay, log=log,
        out=out, resume=resume, force=force, max_steps=max_steps, allow_sorted_shards=allow_sorted_shards), pipeline)
    res = train_student(job)
    if "results_file" in res:  # rank 0, which wrote it
        typer.echo(f"val top-1 {res.get('val_top1', float('nan')):.2f}% -> {res['results_file']}")
    elif "stopped_at" in res and res.get("rank", 0) == 0:
        at = res["stopped_at"]
        typer.echo(f"stopped by --max-steps at epoch {at['epoch'] + 1} step {at['step']}; "
                   f"--resume continues from {res['checkpoint']}")


def run_settings(cfg: dict[str, Any], config: Optional[Path], out: Optional[Path], resume: Optional[bool],
                 resume_path: Optional[Path]) -> tuple[dict[str, Any], Optional[Path], Optional[bool]]:
    """The pipeline with the run's args.yaml over it (``-c``, or by itself on a resume: a resume
    is the run's own settings, nothing to repeat), and the run folder and resume switch that
    ``--resume PATH`` means."""
    if resume_path is not None:
        out, resume = resumed_run(resume_path, out), True
    if resume and config is None:
        run_dir = out or cfg.get("student", {}).get("out")
        config = Path(run_dir) / "args.yaml" if run_dir and (Path(run_dir) / "args.yaml").is_file() else None
    return with_run_args(cfg, config), out, resume


def resumed_run(path: Path, out: Optional[Path]) -> Path:
    """The run folder ``--resume PATH`` continues: PATH itself, or the folder of its
    ``last.pth.tar``; refused when PATH is another file (an epoch's weights hold no optimizer
    or position) or names another run than ``--out``."""
    from civt_cache.errors import ConfigError

    if path.is_dir():
        run_dir = path
    elif path.name == "last.pth.tar" and path.is_file():
        run_dir = path.parent
    elif path.is_file():
        raise ConfigError(f"--resume {path}: not a run's last.pth.tar (an epoch's weights, model_best or "
                          "checkpoint-N, hold no optimizer or position); --resume takes a run folder or its "
                          f"last.pth.tar (here {path.parent / 'last.pth.tar'})")
    else:
        raise ConfigError(f"--resume {path}: no such run folder or checkpoint")
    if out is not None and out.resolve() != run_dir.resolve():
        raise ConfigError(f"--resume {path} continues the run in {run_dir}, but --out names {out}; give one of them")
    return run_dir


def recipe_of_the_cache(cfg: dict[str, Any], flags: dict[str, tuple[str, Any]], cache: str | None,
                        pipeline: Optional[Path], config: Optional[Path]) -> dict[str, Any]:
    """The view recipe a run trains on: the one its cache was made with (a cache replays its
    own views, so the run needs no pipeline to say them again), or without a cache the
    pipeline's [recipe] under the flags. A recipe value given that contradicts the cache's is
    refused, naming the flag or the file that gave it."""
    given = {key: (f"{pipeline or config}: [recipe] {key}", value) for key, value in cfg.get("recipe", {}).items()}
    given.update({key: (flag, value) for flag, (key, value) in flags.items()})
    if cache is None:
        return {key: value for key, (_, value) in given.items()}
    from civt_cache.cache.store import CacheStore
    from civt_cache.errors import ConfigError
    from civt_cache.views.recipe import Recipe

    cached = CacheStore.open(cache).spec.recipe.to_json()
    for key, (where, value) in given.items():
        if key not in cached:
            continue  # an unknown key: Recipe names it
        if Recipe.from_json({**cached, key: value}).to_json()[key] != cached[key]:
            raise ConfigError(f"{where} {value!r}: the cache {cache} was made with {key} = {cached[key]!r}, and "
                              "its views are replayed as made; drop the setting (the cache's recipe is used) or "
                              "build a cache with it")
    return {**cached, **{key: value for key, (_, value) in given.items() if key not in cached}}


#: What args.yaml records of a start, not of the run's settings: read back, it is left out
#: (``-c RUN/args.yaml`` of a resumed run must not resume, force or stop where it stopped).
RECORD_ONLY = frozenset({"resume", "force", "world_size", "max_steps"})


def with_run_args(cfg: dict[str, Any], config: Optional[Path]) -> dict[str, Any]:
    """The pipeline with a run's ``args.yaml`` (what ``train-student`` wrote) over its
    [student] and [recipe] tables: timm's ``-c args.yaml`` reruns a run's settings. Only the
    settings it names count; a key of no setting is refused by name."""
    if config is None:
        return cfg
    import yaml

    from civt_cache.errors import ConfigError

    try:
        args = yaml.safe_load(config.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{config}: cannot read it as a run's args.yaml ({str(e).splitlines()[0]})") from None
    if not isinstance(args, dict):
        raise ConfigError(f"{config}: not a run's args.yaml (a mapping of settings)")
    recipe = args.pop("recipe", None) or {}
    student = {k: v for k, v in args.items() if v is not None and k not in RECORD_ONLY}
    return {**cfg, "student": {**cfg.get("student", {}), **student}, "recipe": {**cfg.get("recipe", {}), **recipe}}


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
    job = build_config(TeacherJob, {section: table, "recipe": recipe}, section, dict(
        manifest=manifest, val_manifest=val_manifest, arch=arch, out=out, epochs=epochs,
        img_size=img_size, seed=seed, batch_size=batch_size, opt=opt, lr=lr, workers=workers,
        device=device, threads=threads), pipeline)
    res = train_teacher(job)
    typer.echo(f"{job.arch}: val top-1 {res['val_top1']:.2f}% top-5 {res['val_top5']:.2f}% in "
               f"{res['train_seconds']:.0f}s -> {job.out} (sha256 {res['sha256'][:16]})")


def eval_cmd(
    pipeline: Optional[Path] = PIPELINE_OPT,
    name: Optional[str] = typer.Option(None, help="Evaluate the pipeline's [teachers.NAME] checkpoint [the student's model_best.pth.tar]."),
    manifest: Optional[str] = typer.Option(None, help="(a file or URL) Validation data manifest [[student] val_manifest]."),
    arch: Optional[str] = typer.Option(None, help="Architecture [the one the checkpoint records]."),
    checkpoint: Optional[Path] = typer.Option(None, help="Checkpoint file, or a Hugging Face folder (model.safetensors + config.json)."),
    img_size: Optional[int] = typer.Option(None, help="Image size [[recipe] img_size, else the one the checkpoint records (ours, timm train.py's args, a Hugging Face config.json), else the model cfg's]."),
    use_ema: bool = typer.Option(False, "--use-ema", help="The checkpoint's EMA weights (state_dict_ema), as timm's validate.py."),
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
            checkpoint = Path(student["out"]) / "model_best.pth.tar"
    manifest = data_location(need(setting(cfg, "student.val_manifest", manifest, str, pipeline), "--manifest",
                                  "[student] val_manifest"))
    metrics = evaluate_checkpoint(manifest, arch,
                                  Path(need(checkpoint, "--checkpoint", "[teachers.NAME] checkpoint or [student] out")),
                                  img_size if img_size is not None else setting(cfg, "recipe.img_size", None, int, pipeline),
                                  device, ema=use_ema, log=lambda line: typer.echo(line, err=True))
    if json_out:
        typer.echo(json.dumps(metrics))
        return
    for k, v in metrics.items():
        typer.echo(f"{k}: {v:.2f}")
