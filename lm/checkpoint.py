"""Checkpoints: an orbax `CheckpointManager` over `workdir/checkpoints` (orbax I/O only; the run's `config.json` is
`lm.config`'s, placement is `lm.sharding`'s).

Each checkpoint step directory holds three items saved together:
- `state`: the `TrainState` (step, params, optimizer state), restored directly into the target shardings, so a run
  can resume on another mesh;
- `data`: the input iterator's state, one JSON file per process (`process_<i>-of-<n>.json`, grain's orbax handler),
  since each process reads its own shard of the data;
- `config`: the run's config as JSON.

`restore(workdir, step, mesh)` is the reader for evaluation, sampling and notebooks: the run's config and its
parameters only (the optimizer state too when the caller passes its optimizer), placed on any mesh. It imports no
training code.

Orbax writes a step into a temporary directory and renames it when every item is complete, and removes leftover
temporary directories on start, so a checkpoint that was being written when the process died is never restored.
Saving is asynchronous: the train loop continues while the arrays are written.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import jax
import ml_collections
import optax
import orbax.checkpoint as ocp

from lm import config as lm_config
from lm import paths
from lm import sharding as sharding_lib
from lm.errors import CheckpointError, LmError

CHECKPOINT_DIR = "checkpoints"


def manager(workdir: str, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(
        paths.resolve(workdir, CHECKPOINT_DIR), options=options,
        item_names=("state", "data", "config"))


def save(checkpoints: ocp.CheckpointManager, step: int, state, data_iterator, config) -> None:
    """Starts an asynchronous save of step `step` (returns before the arrays are written); every process calls it.

    `data_iterator` (a `BatchIterator`) has its state read now, by each process for its own shard."""
    checkpoints.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(lm_config.to_dict(config))), force=True)


def restore_state(checkpoints: ocp.CheckpointManager, step: int, abstract_state, data_iterator):
    """Restores `state` of `step` into the shardings of `abstract_state` (ShapeDtypeStructs) and sets
    `data_iterator` to the saved position of this process's data."""
    try:
        restored = checkpoints.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(data_iterator)))
    except LmError:  # The data state belongs to another stream (IteratorStateError): its message says why.
        raise
    except ValueError as error:
        if "process_" not in str(error):
            raise
        raise CheckpointError(
            f"checkpoint {step} holds no data state for process {jax.process_index()} of {jax.process_count()}: "
            f"it was saved by another number of processes; resume with the process count it was saved with") from None
    return restored.state


@dataclasses.dataclass(frozen=True)
class Restored:
    """A checkpoint read back: the run's config, the parameters (and optimizer state if asked) on `shardings.mesh`."""

    config: ml_collections.ConfigDict
    params: Any
    step: int
    shardings: sharding_lib.Shardings
    opt_state: Any = None

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return self.shardings.mesh


def restore(workdir: str, step: int | None = None, mesh: jax.sharding.Mesh | None = None, *,
            config: ml_collections.ConfigDict | None = None,
            optimizer: optax.GradientTransformation | None = None) -> Restored:
    """Reads the parameters of checkpoint `step` (default: the latest) of the run in `workdir`.

    Args:
      workdir: a training run's directory (`config.json` and `checkpoints/`).
      step: which checkpoint; None for the latest.
      mesh: where to place the arrays; any shape, not necessarily the one the run was trained on (None:
        `lm.sharding.default_mesh`). Parameters take the shardings `config`'s rules give on this mesh.
      config: the config to build the model from (default: the run's own, `workdir/config.json`); it must describe
        the same parameter shapes as the checkpoint.
      optimizer: the run's optimizer (`lm.optim.make_optimizer(config)`) to also read its state, placed by the ZeRO
        stage; None reads only the parameters.

    Raises:
      CheckpointError: the workdir or checkpoints are missing, `step` is not kept, or `config`'s parameters do not
        match the checkpoint's; the message says which.
    """
    checkpoints = _reader(workdir)
    try:
        config = lm_config.read_config(workdir) if config is None else config
        steps = checkpoints.all_steps()
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise CheckpointError(f"step {step} is not among the checkpoints kept in {workdir}: {sorted(steps)}")
        mesh = sharding_lib.default_mesh(config) if mesh is None else mesh
        shardings = sharding_lib.model_shardings(config, mesh, optimizer)
        target = {"params": sharding_lib.abstract_arrays(shardings.abstract_params, shardings.params)}
        if optimizer is not None:
            target["opt_state"] = sharding_lib.abstract_arrays(
                jax.eval_shape(optimizer.init, target["params"]), shardings.opt_state)
        _check_shapes(checkpoints.item_metadata(step).state, {"params": target["params"]}, workdir, step)
        restored = checkpoints.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)))
    finally:
        checkpoints.close()
    state = restored.state
    return Restored(config, state["params"], step, shardings, state.get("opt_state"))


def _reader(workdir: str) -> ocp.CheckpointManager:
    """A manager over `workdir/checkpoints` for reading (it never saves).

    Raises CheckpointError unless the directory holds a complete checkpoint."""
    if not paths.resolve(workdir).is_dir():
        raise CheckpointError(f"workdir {workdir!r} does not exist")
    directory = paths.resolve(workdir, CHECKPOINT_DIR)
    if not directory.is_dir():
        raise CheckpointError(f"{workdir} has no checkpoints ({directory} does not exist)")
    checkpoints = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(create=False),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()})
    if not checkpoints.all_steps():
        raise CheckpointError(f"{workdir} has no complete checkpoints in {directory}")
    return checkpoints


def kept_steps(workdir: str) -> list[int]:
    """The steps of the complete checkpoints in `workdir`, oldest first."""
    checkpoints = _reader(workdir)
    steps = sorted(checkpoints.all_steps())
    checkpoints.close()
    return steps


def _check_shapes(saved_metadata, target, workdir: str, step: int) -> None:
    """Raises CheckpointError naming the first parameter whose saved shape differs from (or is absent in) `target`."""
    saved = {jax.tree_util.keystr(path): leaf.shape
             for path, leaf in jax.tree_util.tree_leaves_with_path(saved_metadata)}
    for path, leaf in jax.tree_util.tree_leaves_with_path(target):
        name = jax.tree_util.keystr(path)
        if saved.get(name) != leaf.shape:
            found = "absent" if name not in saved else f"shape {saved[name]}"
            raise CheckpointError(
                f"the config does not fit checkpoint {step} of {workdir}: {name} is {found} there, the config's model "
                f"needs shape {leaf.shape}")
