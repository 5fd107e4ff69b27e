"""ImageNet's counts without its compute (``civt-cache bench scale --s3``) at 1/256 and 1/64 of
them: no operation's time grows faster than about linearly in samples, shards or units, the
requests a unit costs in a bucket do not grow with the units, and every operation ran through
(stage one's cache complete, the student's first step taken, from a folder and from S3)."""
from __future__ import annotations

import pytest

from civt_cache.bench.scale import bench_scale, over_growth


@pytest.mark.slow
def test_no_operation_grows_faster_than_linearly_in_imagenets_counts(tmp_path) -> None:
    # beside the other slow tests on a shared machine: the read-only operations twice, the faster kept
    pytest.importorskip("moto")
    text, table = bench_scale([1 / 256, 1 / 64], keep=tmp_path, repeats=2, s3=True)
    print(text)
    over = over_growth(table, 1.2)
    assert not over, f"{over}\n{text}"
    said = {op: points[1 / 64].said for op, points in table.rows.items()}
    assert "480 unit(s)" in said["stage one (30,750 x F units x 2 teachers, 0 workers)"]  # 16 shards x 30
    assert "each epoch trains" in said["train-student to its first step"]
    assert "each epoch trains" in said["train-student to its first step (S3)"]
    per_unit = table.rows["  S3 requests per unit (stage one)"]
    assert per_unit[1 / 64].seconds <= 1.2 * per_unit[1 / 256].seconds, text  # a count, not seconds
    objects = table.rows["  S3 objects per unit"]
    assert 5 <= objects[1 / 64].seconds < 5.2, text  # 4 array objects + 1 commit record, the groups' few
