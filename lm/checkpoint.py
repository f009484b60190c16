"""Checkpoints: an orbax `CheckpointManager` over `workdir/checkpoints`, plus the run's `workdir/config.json`.

Each checkpoint step directory holds three items saved together:
- `state`: the `TrainState` (step, params, optimizer state), restored directly into the target shardings, so a run
  can resume on another mesh;
- `data`: the input iterator's JSON state (`lm.data.pipeline.BatchIterator.get_state()`);
- `config`: the run's config as JSON.

Orbax writes a step into a temporary directory and renames it when every item is complete, and removes leftover
temporary directories on start, so a checkpoint that was being written when the process died is never restored.
Saving is asynchronous: the train loop continues while the arrays are written.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import orbax.checkpoint as ocp

from lm import config as lm_config

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


class CheckpointError(ValueError):
    """The workdir or checkpoint cannot be used as asked; the message says which and why."""


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json_best_effort())


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Writes `workdir/config.json` atomically (a crash never leaves a half-written file)."""
    path = os.path.join(workdir, CONFIG_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(config_to_dict(config), f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run in `workdir` was started with."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist: {workdir!r} is not an lm workdir")
    with open(path) as f:
        saved = json.load(f)
    config = lm_config.base_config()
    _merge(config, saved)
    return config


def _merge(config: ml_collections.ConfigDict, values: dict[str, Any]) -> None:
    for key, value in values.items():
        if isinstance(value, dict) and key in config and isinstance(config[key], ml_collections.ConfigDict):
            _merge(config[key], value)
        elif key in config:
            current = config[key]
            config[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value) \
                if isinstance(current, tuple) else value
        else:
            with config.unlocked():
                config[key] = value


def check_same_model(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Raises if `workdir` holds a run whose model differs from `config.model` (its checkpoints would not fit)."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        return
    saved = read_config(workdir).model.to_dict()
    current = config.model.to_dict()
    differences = [f"{k}: {saved.get(k)!r} in the workdir, {current.get(k)!r} now"
                   for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if differences:
        raise CheckpointError(
            f"{workdir} holds a run of another model (config.model {'; '.join(differences)}); use a new --workdir "
            f"or the original config")


def manager(workdir: str, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)), options=options,
        item_names=("state", "data", "config"))


def save(checkpoints: ocp.CheckpointManager, step: int, state, data_state: dict, config) -> None:
    """Starts an asynchronous save of step `step` (returns before the arrays are written)."""
    checkpoints.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config_to_dict(config))), force=True)


def restore_state(checkpoints: ocp.CheckpointManager, step: int, abstract_state):
    """Restores `state` and `data` of `step` into the shardings of `abstract_state` (ShapeDtypeStructs)."""
    restored = checkpoints.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored.state, restored.data
