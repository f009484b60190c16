"""Metric logging: `workdir/metrics.jsonl` (one JSON object per logged step) and TensorBoard event files beside it.

Only process 0 writes. A bucket (`gs://`) cannot append to an object, so there the whole file is rewritten at each
write (it is small: a line per logged step). TensorBoard files are written with the `tensorboard` package's own event
writer, so logging needs no TensorFlow (GPU images do not have it).
"""

from __future__ import annotations

import json
import os
import time

import jax

from lm import paths

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    """Appends metrics of a run. On resume, lines of steps after the restored step are dropped first, since those
    steps are trained again (the file then reads as one uninterrupted run)."""

    def __init__(self, workdir: str, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.path = paths.resolve(workdir, METRICS_FILE)
        self._remote = paths.is_remote(workdir)
        self._lines: list[str] = []
        self._tensorboard = None
        if not self.enabled:
            return
        if self.path.exists():
            self._lines = [line + "\n" for line in self.path.read_text().splitlines()
                           if line.strip() and json.loads(line)["step"] <= resume_step]
            paths.write_atomic(self.path, "".join(self._lines))
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._tensorboard = EventFileWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        line = json.dumps(record) + "\n"
        if self._remote:
            self._lines.append(line)
            self.path.write_text("".join(self._lines))
        else:
            with open(self.path, "a") as f:
                f.write(line)
        from tensorboard.compat.proto import event_pb2, summary_pb2

        summary = summary_pb2.Summary(value=[
            summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in metrics.items()])
        self._tensorboard.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def read(workdir: str) -> list[dict[str, float]]:
    """All records of `workdir/metrics.jsonl`."""
    text = paths.resolve(workdir, METRICS_FILE).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]
