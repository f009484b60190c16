"""Metric logging: `workdir/metrics.jsonl` (one JSON object per logged step) and TensorBoard event files beside it.

Only process 0 writes. TensorBoard files are written with the `tensorboard` package's own event writer, so logging
needs no TensorFlow (GPU images do not have it).
"""

from __future__ import annotations

import json
import os
import time

import jax

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    """Appends metrics of a run. On resume, lines of steps after the restored step are dropped first, since those
    steps are trained again (the file then reads as one uninterrupted run)."""

    def __init__(self, workdir: str, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, METRICS_FILE)
        self._tensorboard = None
        if not self.enabled:
            return
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
            with open(self.path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(self.path + ".tmp", self.path)
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._tensorboard = EventFileWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        from tensorboard.compat.proto import event_pb2, summary_pb2

        summary = summary_pb2.Summary(value=[
            summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in metrics.items()])
        self._tensorboard.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def read(workdir: str) -> list[dict[str, float]]:
    """All records of `workdir/metrics.jsonl`."""
    with open(os.path.join(workdir, METRICS_FILE)) as f:
        return [json.loads(line) for line in f if line.strip()]
