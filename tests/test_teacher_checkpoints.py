"""Any timm classifier checkpoint a user brings loads as a teacher (issue: the real job, item 1).

Each architecture is saved with random weights and few classes in the file formats, wrappers
and key layouts users have, then loaded through ``build_teacher``; the loaded teacher must give
the source model's logits exactly.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import civt_cache  # noqa: F401  (registers rednet*/civt_*)
from civt_cache.data.manifest import load_manifest
from civt_cache.errors import CheckpointError, ConfigError
from civt_cache.models.teachers import build_teacher

from .conftest import TINY, refused, run_cli

ARCHS = ["regnety_006", "regnety_040", "resnet50", "convnext_atto", "efficientnet_b0",
         "vit_tiny_patch16_224", "rednet26", "rednet101"]
NUM_CLASSES = 5


def _source(arch: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=NUM_CLASSES).eval()
    size = 224 if arch.startswith("vit") else 64  # ViT's position embedding is fixed to 224
    return model, torch.randn(2, 3, size, size)


def _save(fmt: str, model: torch.nn.Module, path: Path) -> Path:
    """Write ``model``'s weights as users' files hold them."""
    sd = model.state_dict()
    if fmt == "safetensors":
        path = path.with_suffix(".safetensors")
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif fmt == "plain":
        torch.save(sd, path)
    elif fmt == "ddp-ema":  # timm/DeiT training checkpoints: EMA weights of a DDP-wrapped model
        torch.save({"epoch": 3, "model_ema": {f"module.{k}": v for k, v in sd.items()}}, path)
    elif fmt == "mmcls":  # the RedNet release (mmcls), without BN step counters
        torch.save({"meta": {"epoch": 130}, "state_dict": {
            ("head.fc." + k[3:] if k.startswith("fc.") else "backbone." + k): v
            for k, v in sd.items() if not k.endswith("num_batches_tracked")}}, path)
    elif fmt == "co-advise":  # the official co-advise teacher wrapper: model.* + classifier.*
        torch.save({"model": {("classifier." + k[3:] if k.startswith("fc.") else "model." + k): v
                              for k, v in sd.items()}}, path)
    else:
        raise AssertionError(fmt)
    return path


CASES = [(a, f) for a in ARCHS for f in ("plain", "safetensors", "ddp-ema")]
CASES += [(a, f) for a in ("rednet26", "rednet101") for f in ("mmcls", "co-advise")]


@pytest.mark.parametrize("arch,fmt", CASES, ids=[f"{a}-{f}" for a, f in CASES])
def test_checkpoint_loads_with_the_source_logits(arch: str, fmt: str, tmp_path: Path) -> None:
    model, x = _source(arch)
    path = _save(fmt, model, tmp_path / f"{arch}.pth")
    teacher = build_teacher(f"t={arch}:{path}")
    assert teacher.num_classes == NUM_CLASSES and len(teacher.sha256) == 64
    with torch.no_grad():
        torch.testing.assert_close(teacher.model(x), model(x), rtol=0, atol=0)


@pytest.mark.slow
def test_train_teacher_output_loads(digits, tmp_path: Path) -> None:
    from civt_cache.stages.train_teacher import TeacherJob, train_teacher

    res = train_teacher(TeacherJob(digits["train"], digits["val"], "resnet10t", tmp_path / "t.pth",
                                   epochs=3, img_size=32, batch_size=64, workers=0))
    # measured 83.8% (3 epochs, seed 0, this machine); chance is 10%
    assert res["val_top1"] > 60.0
    t = build_teacher(f"conv=resnet10t:{tmp_path / 't.pth'}")
    assert t.num_classes == 10 and t.sha256 == res["sha256"]
    assert t.mean == tuple(res["mean"])


def test_checkpoint_that_fits_no_layout_names_the_keys(tmp_path: Path) -> None:
    torch.save(timm.create_model("resnet10t", num_classes=10).state_dict(), tmp_path / "r.pth")
    with pytest.raises(ConfigError, match=r"r.pth: does not fit rednet26 .*missing keys "
                                          r"\['layer1.0.bn3.*unexpected keys"):
        build_teacher(f"rednet26:{tmp_path / 'r.pth'}")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="junk.pth: not a readable checkpoint"):
        build_teacher(f"resnet10t:{tmp_path / 'junk.pth'}")
    sd = timm.create_model("resnet10t", num_classes=10).state_dict()
    del sd["fc.weight"], sd["fc.bias"]
    torch.save(sd, tmp_path / "headless.pth")
    with pytest.raises(ConfigError, match=r"headless.pth: does not fit resnet10t.*\['fc.bias', 'fc.weight'\]"):
        build_teacher(f"resnet10t:{tmp_path / 'headless.pth'}")
    with pytest.raises(ConfigError, match="unknown architecture 'nosuchnet'"):
        build_teacher(f"nosuchnet:{tmp_path / 'r.pth'}")


def test_readme_regnety_example_is_accepted(digits, tmp_path: Path) -> None:
    """The README's own example: a plain ``state_dict()`` of timm's regnety_006 as the conv
    teacher of ``cache-teachers``."""
    torch.save(timm.create_model("regnety_006", num_classes=10).state_dict(), tmp_path / "regnety_006.pth")
    run_cli("cache-teachers", "--manifest", str(digits["val"]),
            "--teacher", f"conv=regnety_006:{tmp_path / 'regnety_006.pth'}", "--epochs", "1",
            "--topk", "10", "--img-size", "32", "--out", str(tmp_path / "cache"), "--workers", "0",
            "--batch-size", "128")
    assert len(list((tmp_path / "cache" / "progress").glob("*.json"))) == len(load_manifest(digits["val"]).shards)


def test_a_timm_train_py_checkpoint_is_a_teacher_plain_or_ema(world, tmp_path) -> None:
    """timm's own CheckpointSaver (train.py's): ``args`` as an argparse.Namespace, the weights
    under ``state_dict`` and ``state_dict_ema``. Loaded without running code; ``FILE:ema`` picks
    the EMA weights, and a cache of one is not taken for the other."""
    import argparse

    from timm.utils import CheckpointSaver, ModelEmaV3

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10)
    ema = ModelEmaV3(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    ema.update(model)
    saver = CheckpointSaver(model, torch.optim.SGD(model.parameters(), lr=0.1),
                            args=argparse.Namespace(model="resnet10t", lr=0.1), model_ema=ema,
                            checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path), decreasing=False)
    saver.save_checkpoint(0, metric=50.0)
    best = tmp_path / "model_best.pth.tar"
    plain = build_teacher(f"conv=resnet10t:{best}")
    averaged = build_teacher(f"conv=resnet10t:{best}:ema")
    for k, v in model.state_dict().items():
        assert torch.equal(plain.model.state_dict()[k], v), k
    for k, v in ema.module.state_dict().items():
        assert torch.equal(averaged.model.state_dict()[k], v), k
    assert averaged.sha256 == plain.sha256 + "+ema"
    out = tmp_path / "cache"
    proc = run_cli("cache-teachers", "--pipeline", TINY, "--manifest", str(world["manifest"]),
                   "--teacher", f"conv=resnet10t:{best}:ema", "--epochs", "1", "--topk", "5", "--workers", "0",
                   "--out", str(out))
    assert proc.returncode == 0
    refused(run_cli("train-student", "--pipeline", TINY, "--manifest", str(world["manifest"]),
                    "--val-manifest", str(world["manifest"]), "--cache", str(out), "--teachers", "conv",
                    "--teacher", f"conv=resnet10t:{best}", "--model", "civt_micro", "--epochs", "1",
                    "--device", "cpu", "--out", str(tmp_path / "run"), check=False), "teacher 'conv' was cached from")
    torch.save(model.state_dict(), tmp_path / "plain.pth")
    with pytest.raises(ConfigError, match="holds no EMA weights"):
        build_teacher(f"conv=resnet10t:{tmp_path / 'plain.pth'}:ema")


def test_a_hugging_face_style_folder_is_a_teacher(tmp_path: Path) -> None:
    """timm's own export (``save_for_hf``: config.json + model.safetensors) names the folder
    as the checkpoint; its config says the architecture and classes, another arch is refused."""
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=7).eval()
    save_for_hf(model, str(tmp_path / "hf"), safe_serialization=True)
    teacher = build_teacher(f"conv=resnet10t:{tmp_path / 'hf'}")
    x = torch.randn(2, 3, 32, 32)
    assert teacher.num_classes == 7 and torch.allclose(teacher.model(x), model(x), atol=1e-5)
    with pytest.raises(ConfigError, match="for arch 'resnet10t', not 'resnet18'"):
        build_teacher(f"conv=resnet18:{tmp_path / 'hf'}")
