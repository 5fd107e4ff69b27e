"""The pipeline files in pipelines/: each loads into both stages' settings, and the official
co-advise recipe says what the released code trains with (issue: the real job, item 2)."""
from __future__ import annotations

from pathlib import Path

import pytest

from civt_cache.config import build_config, load_pipeline
from civt_cache.stages.cache_teachers import CacheJob
from civt_cache.stages.train_student import StudentJob
from civt_cache.views.recipe import Recipe

PIPELINES = sorted((Path(__file__).resolve().parents[1] / "pipelines").glob("*.toml"))


@pytest.mark.parametrize("path", PIPELINES, ids=[p.name for p in PIPELINES])
def test_pipeline_builds_both_stages(path: Path) -> None:
    cfg = load_pipeline(path)
    cache = build_config(CacheJob, cfg, "cache", {}, path)
    student = build_config(StudentJob, cfg, "student", {}, path)
    assert cache.recipe == student.recipe  # one recipe, so the student can read the cache
    assert Path(student.cache) == Path(cache.out)


def test_official_coadvise_recipe() -> None:
    path = Path(__file__).resolve().parents[1] / "pipelines" / "coadvise-imagenet.toml"
    cfg = load_pipeline(path)
    cache = build_config(CacheJob, cfg, "cache", {}, path)
    s = build_config(StudentJob, cfg, "student", {}, path)
    assert [t.split(":")[0] for t in cache.teachers] == ["conv=regnety_040", "inv=rednet101"]
    assert s.recipe == Recipe()  # DeiT's recipe, which co-advise trains with, is our default
    assert (s.model, s.epochs, s.batch_size, s.lr) == ("civt_small", 300, 128, None)  # lr 5e-4 x B/512
    assert (s.clip_grad, s.drop_path, s.warmup_epochs, s.weight_decay) == (15.0, 0.0, 20, 0.05)
    assert (s.temperature, s.w_ce, s.w_conv, s.w_inv, s.label_smoothing) == (1.0, 1.0, 1.0, 1.0, 0.1)
    assert cache.epochs == s.epochs  # fresh views every epoch, as the paper trains
    assert s.recipe.mix_mode == "batch" and s.recipe.mix_batch == s.batch_size  # one draw per GPU batch
    bare = StudentJob(manifest="m.json", val_manifest="v.json", out=Path("run"))  # no pipeline file
    assert [getattr(bare, k) for k in ("clip_grad", "drop_path", "warmup_epochs", "weight_decay", "min_lr")] \
        == [getattr(s, k) for k in ("clip_grad", "drop_path", "warmup_epochs", "weight_decay", "min_lr")]


def test_demo_teachers_train_on_the_views_they_are_asked_about() -> None:
    from civt_cache.errors import ConfigError
    from civt_cache.stages.train_teacher import TeacherJob, teacher_recipe

    path = Path(__file__).resolve().parents[1] / "pipelines" / "demo.toml"
    cfg = load_pipeline(path)
    for name, table in cfg["teachers"].items():
        job = build_config(TeacherJob, {"teachers": {**{k: v for k, v in table.items() if k != "checkpoint"},
                                                     "out": table["checkpoint"]}, "recipe": cfg["recipe"]},
                           "teachers", {"manifest": "m.json", "val_manifest": "v.json", "img_size": 32}, path)
        assert teacher_recipe(job) == build_config(CacheJob, cfg, "cache", {}, path).recipe, name
    plain = TeacherJob(manifest="m.json", val_manifest="v.json", arch="resnet10t", out=Path("t.pth"), img_size=32)
    assert teacher_recipe(plain).randaugment == "" and not teacher_recipe(plain).mixing
    with pytest.raises(ConfigError, match="views"):
        TeacherJob(manifest="m.json", val_manifest="v.json", arch="resnet10t", out=Path("t.pth"), views="all")


def test_demo_reuses_only_runs_of_the_same_settings(tmp_path) -> None:
    """A finished demo run is reused only when its settings, teachers and views version are the
    ones asked for: after an upgrade that changes what records render, runs are redone."""
    import json

    from civt_cache.demo_steps import finished as _finished

    key = {"views_version": 2, "job": {"seed": 0, "out": "runs/x"}, "teachers": {"conv=a:b": "f00"}}
    assert not _finished(tmp_path, key)
    (tmp_path / "results.json").write_text("{}")
    assert not _finished(tmp_path, key)  # finished, but by an older civt-cache (no key)
    (tmp_path / "demo_key.json").write_text(json.dumps(key, sort_keys=True))
    assert _finished(tmp_path, key)
    assert not _finished(tmp_path, {**key, "views_version": 3})
    assert not _finished(tmp_path, {**key, "teachers": {"conv=a:b": "bad"}})


def test_the_demo_says_which_claims_hold_at_its_own_spread() -> None:
    """The line under the demo's table: a difference counts only beyond the spread (seeds, or
    with one seed the last epochs' swing); a tie is said as one, a loss as a loss."""
    from civt_cache.demo import _claims

    def student(*last3: float) -> list[dict]:
        return [{"val_top1": 10.0}] * 5 + [{"val_top1": v} for v in last3]

    runs = {"none": [student(50, 51, 49)], "conv": [student(66, 65, 67)], "inv": [student(55, 54, 56)],
            "both": [student(65, 66, 67)], "both (online)": [student(70, 71, 72)]}
    line = _claims(runs)
    assert "both > none holds (+16.0" in line
    assert "both >= best single (conv): cannot be told apart (+0.0" in line
    assert "cache = online does not hold (-5.0" in line
