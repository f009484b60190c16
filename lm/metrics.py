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
from lm.errors import CheckpointError

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    """Appends metrics of a run. On resume, lines of steps after the restored step are dropped first, since those
    steps are trained again (the file then reads as one uninterrupted run), and so is a last line a crash cut short."""

    def __init__(self, workdir: str, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.path = paths.resolve(workdir, METRICS_FILE)
        self._remote = paths.is_remote(workdir)
        self._lines: list[str] = []
        self._tensorboard = None
        if not self.enabled:
            return
        if self.path.exists():
            self._lines = [line + "\n" for line, record in _records(self.path.read_text())
                           if record["step"] <= resume_step]
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
    """All records of `workdir/metrics.jsonl` (a torn last line, from a crash mid-write, is left out)."""
    return [record for _, record in _records(paths.resolve(workdir, METRICS_FILE).read_text())]


def _records(text: str) -> list[tuple[str, dict]]:
    """(line, record) for each line of a metrics file. Only the last line may be torn (appends are sequential); a
    line that does not parse anywhere else means the file is not lm's, and raises."""
    lines = [line for line in text.splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append((line, json.loads(line)))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise CheckpointError(f"{METRICS_FILE} line {i + 1} is not a JSON record: {line[:80]!r}") from None
    return records
