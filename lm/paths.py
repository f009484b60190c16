"""Workdir files on local disk or in a bucket (`gs://...`, as TPU pods need: their hosts share no disk).

Paths are `etils.epath.Path`s (the library orbax uses), which read and write local files directly and buckets
through `tf.io.gfile`. `write_atomic` never leaves a half-written file: locally it writes a temporary file and
renames it; an object in a bucket only appears once its upload is complete.
"""

from __future__ import annotations

import os

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def resolve(path: str | os.PathLike, *parts: str) -> epath.Path:
    """`path / parts...`, absolute when local (orbax wants absolute directories)."""
    joined = epath.Path(path).joinpath(*parts)
    return joined if is_remote(path) else epath.Path(os.path.abspath(joined))


def write_atomic(path: epath.Path, data: str | bytes) -> None:
    """Replaces the file at `path` with `data` in one step (a crash leaves the old file or the new one)."""
    path = epath.Path(path)
    if is_remote(path):
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)
