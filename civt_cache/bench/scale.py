"""``civt-cache bench scale``: ImageNet's counts without ImageNet's compute, at fractions of them.

Two worlds per fraction F, in a temporary folder:

- *sample count*: 1,281,167 x F tiny JPEGs (8 px) in 1000 class folders: ``make-shards`` from
  the folder into shards of 1,250, ``scan-shards`` of the result (hashing against ``sha256sum``
  of the same files), resharding ``make-shards MANIFEST OUT``, and stage two's epoch plan for 8
  ranks x 8 workers;
- *unit count*: 1,025 x F shards of 8 samples (16 px), 300 epochs at 10 a unit and two tiny
  teachers, so 30,750 x F units per teacher with almost no compute: stage one as a whole against
  the same views and teacher forwards alone (the overhead per unit), stage one's rerun on the
  finished cache (its resume), ``inspect``, ``verify`` sampled and ``--full``, and
  ``train-student`` (2 workers) to its first step and its ``--resume``.

Every operation runs as the command a user types, in its own process, timed by the wall clock,
with its peak RSS (the command's own process: loader workers and encoders are bounded apart, in
``tests/test_reshard.py``). The table gives each
operation's seconds and MiB at each fraction and the growth exponent fitted over the fractions
(time ~ F^b, on the seconds above a process's start-up, the fastest of three measured beside
them, floored at ``NOISE_S``; the operations that change nothing they read, the fastest of
``--repeats``): b near 1 is
linear, b over 1 grows faster than the data. Stage one runs with 0 workers, so its overhead per
unit (its time, less its rerun's start-up, per unit, less the views and teacher forwards of a
unit timed alone, both at one thread) is not hidden behind workers computing beside it.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGENET_SAMPLES, IMAGENET_SHARDS, IMAGENET_CLASSES = 1_281_167, 1_025, 1000
EPOCHS, EPOCHS_PER_UNIT, UNIT_SAMPLES = 300, 10, 8
#: Runs ``civt-cache ARGS`` (or the code after ``--code``) in this process and prints its own peak
#: RSS (VmHWM: this process's since its exec, not the parent's that ru_maxrss carries over) and
#: its largest child's (a loader worker's, shared pages counted), in KiB.
_MEASURED = """import resource, sys
args = sys.argv[1:]
try:
    if args[0] == '--code':
        exec(args[1])
    else:
        sys.argv = ['civt-cache'] + args
        from civt_cache.cli import main
        main()
    code = 0
except SystemExit as e:
    code = e.code
own = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0]
print('PEAK_RSS_KIB', own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""
_PLAN = """from civt_cache.data.manifest import load_manifest
from civt_cache.loader.batches import epoch_plan
m = load_manifest({manifest!r})
plans = [epoch_plan(m, 0, 0, r, 8, 128, 8) for r in range(8)]
print('steps', plans[0].steps, file=__import__('sys').stderr)
"""
_COMPUTE = """import time, torch
torch.set_num_threads(1)
from civt_cache.data.manifest import load_manifest
from civt_cache.cache.store import CacheStore
from civt_cache.loader.units import UnitReader
from civt_cache.models.teachers import build_teacher, teacher_logits
from civt_cache.views.engine import render_encoded
store = CacheStore.open({cache!r}); m = load_manifest({manifest!r}); spec = store.spec
units = [(s, 0) for s in range(min(len(m.shards), {units}))]
records = {{u: store.unit_record(*u) for u in units}}
teachers = [build_teacher(t, torch.device('cpu')) for t in {teachers!r}]
def run(todo):
    for group in UnitReader(m, {cache!r}, todo, records, [], spec):
        for views in render_encoded(group.images, group.records, group.rows, spec.recipe, torch.device('cpu'), group.names):
            for t in teachers:
                teacher_logits(t, views, spec.recipe.mean, spec.recipe.std, torch.device('cpu')).topk(spec.topk, dim=1)
run(units[:1])  # warm-up
t0 = time.perf_counter()
run(units)
print('PER_UNIT_S', (time.perf_counter() - t0) / len(units), file=__import__('sys').stderr)
"""


@dataclass
class Measured:
    """One operation at one fraction: seconds, peak MiB (the command's own process, its largest
    child), and what its output said."""

    seconds: float
    rss_mib: float
    child_mib: float = 0.0
    said: str = ""


@dataclass
class ScaleTable:
    """Operation -> fraction -> Measured, plus notes printed under the table."""

    rows: dict[str, dict[float, Measured]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, op: str, fraction: float, m: Measured) -> None:
        self.rows.setdefault(op, {})[fraction] = m


def measured(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> Measured:
    """Run ``civt-cache ARGS`` (or ``["--code", CODE]``) as its own process, with ``env`` added to
    its environment: wall time and peak RSS."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _MEASURED, *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **env} if env else None)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"bench scale: {' '.join(args[:3])} failed:\n{proc.stderr[-3000:]}")
    own, child = peak_rss_kib(proc.stderr)
    return Measured(seconds, own / 1024, child / 1024, proc.stdout + proc.stderr)


def peak_rss_kib(stderr: str) -> tuple[int, int]:
    """The peak RSS (own, largest child) in KiB that ``_MEASURED`` printed."""
    line = [ln for ln in stderr.splitlines() if ln.startswith("PEAK_RSS_KIB")][-1]
    own, child = (int(v) for v in line.split()[1:])
    return own, child


def fastest(args: list[str], cwd: Path, runs: int) -> Measured:
    """The fastest of ``runs`` runs of an operation that changes nothing it reads: noise on a
    shared machine only ever adds time, so the minimum is the operation's own cost."""
    return min((measured(args, cwd) for _ in range(max(1, runs))), key=lambda m: m.seconds)


def tiny_jpeg(rng: np.random.Generator, size: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def sample_world(table: ScaleTable, fraction: float, root: Path, repeats: int = 1) -> None:
    """The sample-count operations at ``fraction`` of ImageNet's samples."""
    n = round(IMAGENET_SAMPLES * fraction)
    rng = np.random.default_rng(0)
    pool = [tiny_jpeg(rng, 8) for _ in range(256)]
    folder = root / "folder"
    for c in range(IMAGENET_CLASSES):
        (folder / f"n{c:08d}").mkdir(parents=True)
    for i in range(n):  # class folders as ImageNet's: sample i in class i * 1000 // n (sorted)
        (folder / f"n{i * IMAGENET_CLASSES // n:08d}" / f"{i:08d}.JPEG").write_bytes(pool[i % len(pool)])
    made = measured(["make-shards", str(folder), str(root / "shards"), "--name", "in", "--shard-size", "1250",
                     "--manifest", str(root / "in.json"), "--workers", "2"], root)
    table.add("make-shards from a class folder", fraction, made)
    scanned = fastest(["scan-shards", str(root / "shards"), "--name", "scan", "--manifest",
                       str(root / "scan.json")], root, repeats)
    table.add("scan-shards (read + sha256 of every shard)", fraction, scanned)
    shards = sorted((root / "shards").glob("*.tar"))
    t0 = time.perf_counter()
    subprocess.run(["sha256sum", *map(str, shards)], check=True, capture_output=True)
    table.add("  sha256sum of the same shards", fraction, Measured(time.perf_counter() - t0, 0.0))
    table.add("make-shards MANIFEST (reshard)", fraction,
              measured(["make-shards", str(root / "scan.json"), str(root / "resharded"), "--name", "re",
                        "--shard-size", "1250", "--manifest", str(root / "re.json"), "--workers", "2"], root))
    table.add("stage two's epoch plan, 8 ranks x 8 workers", fraction,
              fastest(["--code", _PLAN.format(manifest=str(root / "in.json"))], root, repeats))


def unit_world(table: ScaleTable, fraction: float, root: Path, repeats: int = 1, s3: bool = False) -> None:
    """The unit-count operations at ``fraction`` of ImageNet's shards (30,750 x F units); with
    ``s3`` the cache also in a local S3 server, made by processes claiming units (``s3_world``)."""
    import timm
    import torch

    from civt_cache.data.writer import SourceItem, write_shards

    shards = max(2, round(IMAGENET_SHARDS * fraction))
    rng = np.random.default_rng(1)
    items = [SourceItem(f"u{i:08d}", int(rng.integers(IMAGENET_CLASSES)), "bench", tiny_jpeg(rng, 16))
             for i in range(shards * UNIT_SAMPLES)]
    classes = [f"n{c:08d}" for c in range(IMAGENET_CLASSES)]
    write_shards(items, classes, root / "ushards", "units", UNIT_SAMPLES, 0, "bench scale", root / "u.json", workers=1)
    specs = []
    for name in ("conv", "inv"):
        torch.manual_seed(len(specs))
        path = root / f"{name}.pth"
        torch.save(timm.create_model("test_resnet", num_classes=IMAGENET_CLASSES).state_dict(), path)
        specs.append(f"{name}=test_resnet:{path}")
    (root / "scale.toml").write_text("[recipe]\nimg_size = 16\n")
    teach = ["--teacher", specs[0], "--teacher", specs[1]]
    stage_one = ["cache-teachers", "--pipeline", str(root / "scale.toml"), "--manifest", str(root / "u.json"),
                 *teach, "--epochs", str(EPOCHS), "--epochs-per-unit", str(EPOCHS_PER_UNIT), "--topk", "10",
                 "--out", str(root / "cache"), "--workers", "0", "--threads", "1", "--batch-size", "80", "--device", "cpu"]
    units = shards * EPOCHS // EPOCHS_PER_UNIT
    whole = measured(stage_one, root)  # one process: no worker hides the overhead behind compute
    table.add("stage one (30,750 x F units x 2 teachers, 0 workers)", fraction, whole)
    table.notes.append(f"F = {fraction:g}: {shards:,} unit-world shards, {units:,} units per teacher")
    compute = measured(["--code", _COMPUTE.format(cache=str(root / "cache"), manifest=str(root / "u.json"),
                                                  units=min(shards, 16), teachers=specs)], root)
    per_unit = float([ln for ln in compute.said.splitlines() if ln.startswith("PER_UNIT_S")][-1].split()[1])
    rerun = fastest(stage_one, root, repeats)
    table.add("stage one's rerun on the finished cache", fraction, rerun)
    overhead = (whole.seconds - rerun.seconds) / units - per_unit
    table.add("  stage one's overhead per unit (ms)", fraction, Measured(overhead * 1e3, 0.0))
    cache = str(root / "cache")
    table.add("inspect", fraction, fastest(["inspect", cache], root, repeats))
    table.add("verify --samples 8", fraction, fastest(["verify", cache, "--samples", "8", "--device", "cpu"], root,
                                                      repeats))
    table.add("verify --full", fraction, fastest(["verify", cache, "--full"], root, repeats))
    student = ["train-student", "--pipeline", str(root / "scale.toml"), "--manifest", str(root / "u.json"),
               "--val-manifest", str(root / "u.json"), "--cache", cache, "--model", "civt_micro",
               "--epochs", str(EPOCHS), "--batch-size", "8", "--workers", "2", "--device", "cpu",
               "--out", str(root / "run"), "--warmup-epochs", "0"]
    table.add("train-student to its first step", fraction, measured([*student, "--max-steps", "1"], root))
    table.add("train-student --resume to its next step", fraction,
              measured([*student, "--max-steps", "2", "--resume"], root))
    if s3:
        from civt_cache.bench.s3_world import claimed_in_s3

        s3_student = _replaced(_replaced(student, "--cache", "CACHE"), "--out", str(root / "run-s3"))
        rows, lines = claimed_in_s3(
            _replaced(stage_one, "--out", "CACHE"),
            {"inspect": ["inspect", "CACHE"], "verify --samples 8": ["verify", "CACHE", "--samples", "8", "--device", "cpu"],
             "train-student to its first step": [*s3_student, "--max-steps", "1"]},
            units, root)
        for op, m in rows.items():
            table.add(op, fraction, m)
        table.notes += [f"F = {fraction:g}: {line}" for line in lines]


def _replaced(args: list[str], flag: str, value: str) -> list[str]:
    """``args`` with the value after ``flag`` replaced by ``value``."""
    at = args.index(flag) + 1
    return [*args[:at], value, *args[at + 1:]]


#: Seconds above start-up under which an operation counts as not growing: start-up itself varies
#: by about this much from one process to the next on a busy machine.
NOISE_S = 0.5


def growth(points: dict[float, Measured], start_up: dict[float, Measured] | None = None) -> float | None:
    """The exponent b of seconds ~ F^b, least squares over the fractions (None under two), on
    the seconds above a process's start-up (``start_up``), which no data size changes, floored
    at ``NOISE_S``."""
    base = min(m.seconds for m in start_up.values()) if start_up else 0.0
    pts = [(math.log(f), math.log(max(m.seconds - base, NOISE_S))) for f, m in points.items()]
    if len(pts) < 2:
        return None
    xs, ys = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    return float(np.polyfit(xs, ys, 1)[0])


START_UP = "a process's start-up (python, torch, civt_cache.cli)"


def table_growth(table: ScaleTable) -> dict[str, float | None]:
    """Each operation's growth exponent as the table prints it: above the start-up row, except
    for that row and the derived rows (indented) under an operation."""
    start_up = table.rows.get(START_UP)
    return {op: growth(points, None if op == START_UP or op.startswith("  ") else start_up)
            for op, points in table.rows.items()}


def over_growth(table: ScaleTable, limit: float) -> dict[str, float]:
    """The measured operations (not start-up, not derived rows) whose growth exceeds ``limit``."""
    return {op: b for op, b in table_growth(table).items()
            if op != START_UP and not op.startswith("  ") and b is not None and b > limit}


def _cell(m: Measured) -> str:
    if not m.rss_mib:
        return f"{m.seconds:,.2f}"
    return f"{m.seconds:,.2f} s, {m.rss_mib:,.0f} MiB"


def format_scale(table: ScaleTable, fractions: list[float]) -> str:
    head = "| operation | " + " | ".join(f"F = 1/{round(1 / f)}" if f < 1 else "F = 1"
                                         for f in fractions) + " | growth b |"
    lines = [head, "|" + "---|" * (len(fractions) + 2)]
    for (op, points), b in zip(table.rows.items(), table_growth(table).values()):
        cells = [_cell(points[f]) if f in points else "-" for f in fractions]
        lines.append(f"| {op} | " + " | ".join(cells) + (f" | {b:.2f} |" if b is not None else " | - |"))
    return "\n".join(lines + table.notes)


def bench_scale(fractions: list[float], sample_count: bool = True, unit_count: bool = True,
                keep: Path | None = None, repeats: int = 1, s3: bool = False) -> tuple[str, ScaleTable]:
    """The table of every operation at every fraction (see the module docstring); operations
    that change nothing they read are timed ``repeats`` times, the fastest kept."""
    table = ScaleTable()
    for fraction in sorted(fractions):
        with tempfile.TemporaryDirectory(dir=keep) as tmp:
            table.add(START_UP, fraction, fastest(["--code", "import torch, civt_cache.cli"], Path(tmp), 3))
            if sample_count:
                (Path(tmp) / "s").mkdir()
                sample_world(table, fraction, Path(tmp) / "s", repeats)
            if unit_count:
                (Path(tmp) / "u").mkdir()
                unit_world(table, fraction, Path(tmp) / "u", repeats, s3)
    table.notes.append(f"fractions of ImageNet-1k: {IMAGENET_SAMPLES:,} samples; {IMAGENET_SHARDS:,} shards x "
                       f"{EPOCHS // EPOCHS_PER_UNIT} units ({EPOCHS} epochs, {EPOCHS_PER_UNIT} a unit) per teacher; "
                       f"{os.cpu_count()} cores")
    return format_scale(table, sorted(fractions)), table
