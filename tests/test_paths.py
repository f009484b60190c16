"""Workdir files: atomic writes, and metrics.jsonl kept whole where appending is impossible (buckets)."""

import json

import pytest

from lm import metrics, paths


def test_write_atomic_replaces_the_whole_file_and_leaves_no_temporary(tmp_path):
    target = paths.resolve(str(tmp_path), "config.json")
    paths.write_atomic(target, "old")
    paths.write_atomic(target, json.dumps({"a": 1}))
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_resolve_keeps_bucket_paths_and_makes_local_ones_absolute():
    assert str(paths.resolve("gs://bucket/run", "checkpoints")) == "gs://bucket/run/checkpoints"
    assert paths.resolve("relative/run", "x").is_absolute()
    assert paths.is_remote("gs://b") and not paths.is_remote("/tmp/b")


@pytest.mark.parametrize("remote", [False, True])
def test_metrics_resume_drops_later_steps_locally_and_in_buckets(tmp_path, monkeypatch, remote):
    # A bucket is simulated by forcing the rewrite-the-whole-file path on a local directory.
    monkeypatch.setattr(paths, "is_remote", lambda path: remote)
    workdir = str(tmp_path)
    writer = metrics.MetricsWriter(workdir)
    for step in range(1, 6):
        writer.write(step, {"loss": float(step)})
    writer.close()
    resumed = metrics.MetricsWriter(workdir, resume_step=3)
    resumed.write(4, {"loss": 40.0})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in metrics.read(workdir)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
