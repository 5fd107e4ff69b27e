"""``civt-cache bench unit-memory``: stage one's peak memory against its epochs per unit, at
ImageNet's image size.

Why: a unit is one shard's rows for ``--epochs-per-unit`` epochs, and stage one decodes each pair
group of a unit once for all of its epochs. Held at once, the uint8 crops of every epoch grow
with the epochs per unit (256 rows x 30 epochs x 224 x 224 x 3 bytes = 1.1 GiB a group); the
view engine builds them in passes the decode budget bounds (``views.engine.render_encoded``).
This runs ``cache-teachers`` on one shard of ImageNet-shaped JPEGs at each epochs-per-unit
setting, as its own process (0 workers, so the process holds every view it builds), and prints
its peak RSS beside the crops that all epochs at once would hold.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from civt_cache.bench.scale import measured

#: Rows a stage-one pair group holds (``loader.units``), so one group is the unit of memory.
GROUP_ROWS = 256


def bench_unit_memory(epochs_per_unit: list[int], samples: int = GROUP_ROWS, img_size: int = 224) -> str:
    """One table row per epochs-per-unit setting: views built, seconds, peak RSS, and the crops
    that holding all of a group's epochs at once would take."""
    import timm
    import torch

    from civt_cache.data.synthetic import write_imagenet_like

    lines = [f"bench unit-memory: cache-teachers on {samples} ImageNet-shaped JPEGs at {img_size} px, "
             "2 tiny teachers, 0 workers, 1 thread; peak RSS with the default decode budget, and with one "
             "so large that every epoch of a group is built from one decode (all crops held at once)",
             f"{'epochs/unit':>11} {'views':>7} {'seconds':>8} {'peak RSS MiB':>13} {'unbounded: s':>13} "
             f"{'MiB':>7} {'all-epoch crops MiB':>20}"]
    with tempfile.TemporaryDirectory(prefix="civt-unit-memory-") as tmp:
        root = Path(tmp)
        manifest = write_imagenet_like(root / "data", samples)
        teachers = []
        for name in ("conv", "inv"):
            path = root / f"{name}.pth"
            torch.save(timm.create_model("test_resnet", num_classes=manifest.num_classes).state_dict(), path)
            teachers += ["--teacher", f"{name}=test_resnet:{path}"]
        (root / "p.toml").write_text(f"[recipe]\nimg_size = {img_size}\n")
        for e in epochs_per_unit:
            runs = []
            for budget, out in (([], "bounded"), (["--decode-budget", str(1 << 40)], "unbounded")):
                runs.append(measured([*budget, "cache-teachers", "--pipeline", str(root / "p.toml"), "--manifest",
                                      str(root / "data" / "synthetic-imagenet.json"), *teachers, "--epochs", str(e),
                                      "--epochs-per-unit", str(e), "--topk", "10", "--out", str(root / f"{out}-{e}"),
                                      "--workers", "0", "--threads", "1", "--device", "cpu",
                                      "--allow-sorted-shards"], root))
            crops = min(samples, GROUP_ROWS) * e * 3 * img_size ** 2 / 2**20
            lines.append(f"{e:>11} {samples * e:>7,} {runs[0].seconds:>8.1f} {runs[0].rss_mib:>13,.0f} "
                         f"{runs[1].seconds:>13.1f} {runs[1].rss_mib:>7,.0f} {crops:>20,.0f}")
    return "\n".join(lines)
