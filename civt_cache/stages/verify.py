"""``inspect`` and ``verify``: read a cache and say what it holds and whether it is right."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from civt_cache.cache.scan import scan_cache
from civt_cache.cache.spec import FP16_LOWEST
from civt_cache.cache.store import CacheStore
from civt_cache.data.manifest import data_location, load_manifest
from civt_cache.distributed import pick_device
from civt_cache.errors import CacheMismatchError, CorruptUnitError
from civt_cache.loader.soft_targets import stored_target_loss
from civt_cache.loader.units import ShardRead
from civt_cache.models.teachers import build_teacher, parse_teacher_spec, teacher_logits
from civt_cache.views.engine import render_encoded
from civt_cache.views.records import LAM, LAM_ONE, MIX_MODE, MIX_NONE, PARTNER

INSPECT_MAX_UNITS = 64


def inspect_cache(root: Path | str) -> str:
    """A human-readable report on a cache (see the ``inspect`` command)."""
    store = CacheStore.open(root)
    s = store.spec
    teachers = store.teachers()
    lines = [f"cache {root}", f"  data: {s.manifest_name} ({s.num_shards} shards, fingerprint "
             f"{s.manifest_fingerprint[:12]})",
             f"  views: {s.epochs} epochs x {s.num_shards} shards, {s.epochs_per_unit} epoch(s)/unit, "
             f"img {s.recipe.img_size}px, seed {s.seed}, top-{s.topk} of {s.num_classes} classes"]
    for name, ident in teachers.items():
        lines.append(f"  teacher {name}: {ident['arch']} (checkpoint sha256 {ident['checkpoint_sha256'][:12]})")
    scan = scan_cache(store, leases=True)
    total = len(scan.units)
    components = ["views", *teachers]
    done = {c: sum(u.has(c) for u in scan.units) for c in components}
    lines.append(f"  units: {total} in all; views committed in {done['views']}; "
                 + ", ".join(f"{n} in {done[n]}" for n in teachers))
    missing = scan.missing_lines(teachers)
    if missing:
        lines.append(f"  incomplete: {len(scan.incomplete(teachers))} unit(s) (rerun cache-teachers to "
                     "fill them; units leased by a running process are being filled now)")
        lines += [f"    {line}" for line in missing]
    damaged = scan.lost()
    for why in scan.unreadable:
        lines.append(f"  DAMAGED: {why} (rerun cache-teachers to redo it)")
    for why in damaged[:8]:
        lines.append(f"  DAMAGED: {why} (rerun cache-teachers to redo it)")
    if len(damaged) > 8:
        lines.append(f"  DAMAGED: ... {len(damaged) - 8} more")
    committed_units = [(u.shard, u.block, u.record) for u in scan.units if u.has("views")]
    views_committed = sum(r["num_samples"] * len(r["epochs"]) for _, _, r in committed_units)
    lines.append(f"  chunk contents not checked here: `civt-cache verify {root} --full` checks every "
                 "committed unit's checksums")
    sizes = store.disk_bytes()
    all_bytes = sum(sizes.values())
    lines.append(f"  bytes on disk: {all_bytes:,} ("
                 + ", ".join(f"{k} {v:,}" for k, v in sizes.items()) + ")")
    if views_committed:
        lines.append(f"  bytes per view: {all_bytes / views_committed:.1f} "
                     f"(records {sizes['views'] / views_committed:.1f}"
                     + "".join(f", {n} {sizes['teachers/' + n] / views_committed:.1f}" for n in teachers)
                     + ")")
    if s.topk < s.num_classes:
        lines.append(f"  targets: each teacher's top-{s.topk} of {s.num_classes} classes per view, the rest's mass "
                     f"spread evenly; what that loses (KL to the full softmax, mass outside the top-{s.topk}): "
                     f"`civt-cache verify {root}`")
    lines += _agreement(store, committed_units[:INSPECT_MAX_UNITS], list(teachers))
    if len(committed_units) > INSPECT_MAX_UNITS:
        lines.append(f"  (agreement over the first {INSPECT_MAX_UNITS} committed units)")
    return "\n".join(lines)


def _agreement(store: CacheStore, units: list, teachers: list[str]) -> list[str]:
    """Top-1 agreement of each teacher with the dominant label and with each other teacher."""
    top1: dict[str, list[np.ndarray]] = {t: [] for t in teachers}
    labels, keep = [], []
    skipped = []
    for shard, block, rec in units:
        n = rec["num_samples"]
        try:
            recs, _, own = store.read_unit_views(shard, block, rec)
            tops = {t: store.read_unit_teacher(t, shard, block, rec)[1][..., 0] if t in rec["teachers"]
                    else np.full((len(rec["epochs"]), n), -1) for t in teachers}
        except CorruptUnitError as e:
            skipped.append(e.where)
            continue
        for j in range(len(rec["epochs"])):
            r = recs[j]
            # the row's own label is the view's dominant label unless its partner outweighs it
            keep.append((r[:, MIX_MODE] == MIX_NONE) | (r[:, LAM] >= LAM_ONE // 2))
            labels.append(own)
            for t in teachers:
                top1[t].append(tops[t][j])
    out = [f"  DAMAGED: {why} (run verify --full, then cache-teachers --repair)" for why in skipped]
    if not labels:
        return out + ["  agreement: no committed units yet"]
    y, k = np.concatenate(labels), np.concatenate(keep)
    for t in teachers:
        p = np.concatenate(top1[t])
        valid = k & (p >= 0)
        if valid.any():
            out.append(f"  {t} top-1 = label (dominant label of the view): "
                       f"{100 * (p[valid] == y[valid]).mean():.1f}% of {int(valid.sum())} views")
    for i, a in enumerate(teachers):
        for b in teachers[i + 1:]:
            pa, pb = np.concatenate(top1[a]), np.concatenate(top1[b])
            both = (pa >= 0) & (pb >= 0)
            if both.any():
                out.append(f"  {a} vs {b} top-1 agreement: {100 * (pa[both] == pb[both]).mean():.1f}%")
    return out


def cached_teacher_specs(root: Path | str, stored: dict[str, dict], overrides: list[str]) -> list[str]:
    """``NAME=ARCH:CKPT`` of every cached teacher: from the path the cache recorded, or from
    ``overrides`` (``--teacher``) for files that moved. The file's sha256 is checked later."""
    given = {parse_teacher_spec(spec)[0]: spec for spec in overrides}
    unknown = sorted(set(given) - set(stored))
    if unknown:
        raise CacheMismatchError(f"{root}: no teacher {unknown[0]!r} in the cache (has {sorted(stored)})")
    specs = []
    for name, ident in stored.items():
        if name in given:
            specs.append(given[name])
            continue
        path = ident.get("checkpoint", "")
        if not path or not Path(path).is_file():
            raise CacheMismatchError(f"{root}: teacher {name!r} was cached from {path or 'a file it did not record'}, "
                                     f"which is not there now; give --teacher {name}={ident['arch']}:NEW_PATH")
        specs.append(f"{name}={ident['arch']}:{path}")
    return specs


@dataclass
class StoredTargetLoss:
    """What the cache's top-k keeps of each teacher, over the views ``verify`` rebuilt: per view,
    KL(full softmax || the stored target a student trains on) and the mass outside the top-k."""
    k: int
    num_classes: int
    kl: dict[str, list[float]] = field(default_factory=dict)
    tail: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, full: torch.Tensor, logprobs: torch.Tensor, idx: torch.Tensor) -> None:
        kl, tail = stored_target_loss(full[None], logprobs[None], idx[None])
        self.kl.setdefault(name, []).append(float(kl))
        self.tail.setdefault(name, []).append(float(tail))

    def summary(self) -> dict[str, dict[str, float]]:
        """Per teacher: mean and 99th percentile of the KL (nats) and of the mass outside the top-k."""
        return {name: {"kl_mean": float(np.mean(kl)), "kl_p99": float(np.percentile(kl, 99)),
                       "tail_mean": float(np.mean(self.tail[name])),
                       "tail_p99": float(np.percentile(self.tail[name], 99)), "views": len(kl)}
                for name, kl in self.kl.items()}

    def lines(self) -> list[str]:
        rest = ("the rest spread evenly over the other classes" if self.k < self.num_classes
                else "every class kept: only the float16 storage differs")
        out = [f"stored top-{self.k} of {self.num_classes} against each teacher's full softmax ({rest}):"]
        for name, s in self.summary().items():
            out.append(f"  {name}: KL(full || stored) mean {s['kl_mean']:.4f} nats, 99th percentile "
                       f"{s['kl_p99']:.4f}; mass outside the top-{self.k} mean {s['tail_mean']:.4f}, "
                       f"99th percentile {s['tail_p99']:.4f} ({s['views']} views)")
        return out


@dataclass
class Verification:
    report: str
    ok: bool
    targets: StoredTargetLoss


def verify_cache(root: Path | str, manifest_path: Path | str | None, teacher_specs: list[str], samples: int,
                 seed: int, device_pref: str = "auto") -> Verification:
    """Rebuild ``samples`` random committed views through the same view function, check their
    records regenerate identically, rerun every cached teacher and compare with the stored top-k,
    and measure what the top-k keeps of each teacher's full softmax (``StoredTargetLoss``).
    The data manifest and checkpoints are found where the cache recorded them unless given."""
    store = CacheStore.open(root)
    if manifest_path is None:
        manifest_path = data_location(store.spec.manifest_path)
        if not store.spec.manifest_path or (isinstance(manifest_path, Path) and not manifest_path.is_file()):
            raise CacheMismatchError(f"{root}: its data manifest {store.spec.manifest_path or '(not recorded)'} "
                                     "is not there now; give --manifest PATH")
    manifest = load_manifest(manifest_path)
    diffs = store.spec.data_differences(manifest.fingerprint(), f"{manifest.name} ({manifest_path})", store.spec.recipe)
    if diffs:
        raise CacheMismatchError(f"{root}: " + "; ".join(diffs))
    device = pick_device(device_pref)
    stored_teachers = store.teachers()
    teachers = [build_teacher(t, device) for t in cached_teacher_specs(root, stored_teachers, teacher_specs)]
    for t in teachers:
        ident = stored_teachers[t.name]
        if ident["checkpoint_sha256"] != t.sha256:
            raise CacheMismatchError(f"{root}: teacher {t.name!r} ({t.checkpoint}) is not the one "
                                     f"cached: sha256 {t.sha256[:12]}, cached {ident['checkpoint_sha256'][:12]}")
    committed = [(u.shard, u.block, u.record) for u in scan_cache(store, chunks=False).units if u.has("views")]
    targets = StoredTargetLoss(store.spec.topk, store.spec.num_classes)
    if not committed:
        return Verification(f"{root}: no committed units to verify", False, targets)
    rng = np.random.default_rng(seed)
    picks: dict[int, list[tuple[int, int]]] = {}
    for _ in range(samples):
        shard, block, rec = committed[rng.integers(len(committed))]
        picks.setdefault(shard, []).append((int(rng.choice(rec["epochs"])),
                                            int(rng.integers(rec["num_samples"])), rec))
    recipe, spec = store.spec.recipe, store.spec
    worst, mismatched, total_k, record_errors, checked = 0.0, 0, 0, 0, 0
    budget_ok = True
    atol, rtol, max_mismatch = (0.02, 2**-9, 0.02) if device.type == "cpu" else (0.25, 0.03, 0.1)
    for shard, items in sorted(picks.items()):
        read = ShardRead(manifest, shard)
        epochs = {}
        for epoch, pos, _ in items:
            if epoch not in epochs:  # each (shard, epoch): one checked read, one re-sampling
                recs, outs = read.cached_epoch(store, epoch, [t.name for t in teachers])
                epochs[epoch] = recs, outs, read.sampled_records(recipe, spec.seed, [epoch])[0]
            recs, outs, fresh = epochs[epoch]
            record_errors += int(not np.array_equal(fresh[pos], recs[pos]))
            pair = [pos, int(recs[pos, PARTNER]) - read.base]
            view = next(render_encoded([read.image(p) for p in pair], [recs[pair]], [read.rows[p] for p in pair],
                                       recipe, device, [read.names[p] for p in pair], outputs=[0]))
            for t in teachers:
                full = teacher_logits(t, view, recipe.mean, recipe.std, device)[0].cpu()
                logprobs, idx, lse = (torch.from_numpy(np.asarray(a[pos])) for a in outs[t.name])
                targets.add(t.name, full, logprobs, idx)
                fresh_lse = torch.logsumexp(full, 0)
                diff = ((full[idx] - fresh_lse).clamp_min(FP16_LOWEST) - logprobs).abs()  # as stored
                worst = max(worst, float(diff.nan_to_num(math.inf).max()))
                budget_ok &= bool((diff <= atol + rtol * logprobs.abs()).all())
                worst = max(worst, abs(float(fresh_lse) - float(lse)))
                budget_ok &= bool(torch.isfinite(full).all() and torch.isfinite(lse))
                fresh_idx = set(full.topk(spec.topk).indices.tolist())
                mismatched += len(fresh_idx - set(idx.tolist()))
                total_k += spec.topk
            checked += 1
    rate = mismatched / max(total_k, 1)
    ok = budget_ok and rate <= max_mismatch and record_errors == 0
    report = (f"verified {checked} views x {len(teachers)} teacher(s) on {device}: largest "
              f"log-probability difference {worst:.4g} (tolerance {atol} + {rtol:.3g}*|value|), top-{spec.topk} "
              f"index mismatch {100 * rate:.2f}% (tolerance {100 * max_mismatch:.0f}%), "
              f"records regenerated differently: {record_errors} -> {'OK' if ok else 'FAILED'}")
    return Verification("\n".join([report, *targets.lines()]), ok, targets)


def verify_full(root: Path | str) -> tuple[str, bool]:
    """Check every committed unit's chunks (present, CRC32C, commit-record checksums) without
    running any teacher, and that every unit is committed for every teacher; list the damaged
    and the missing units and how to finish them."""
    store = CacheStore.open(root)
    teachers = list(store.teachers())
    scan = scan_cache(store, chunks=False, leases=True)
    committed = [u for u in scan.units if u.record is not None]
    bad = [f"  unit (shard {u.shard}, block {u.block}) {c}: {why}"
           for u in committed for c, why in store.check_unit(u.shard, u.block, u.record).items()]
    bad += [f"  {why}" for why in scan.unreadable]
    missing = scan.missing_lines(teachers)
    head = f"{root}: {len(committed)} committed unit(s) checked"
    if not bad and not missing:
        return f"{head}, all {len(scan.units)} unit(s) complete, all sound -> OK", True
    out = [f"{head}, {len(bad)} problem(s):" if bad else head, *bad]
    if missing:
        out += [f"{len(scan.incomplete(teachers))} of {len(scan.units)} unit(s) incomplete:",
                *(f"  {line}" for line in missing)]
    return ("\n".join(out) + "\n-> FAILED. Finish or recompute them with `civt-cache cache-teachers ... "
            "--repair` (same settings as the cache was built with).", False)
