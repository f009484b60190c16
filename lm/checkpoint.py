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
training code. A PEFT run's checkpoints hold its adapters only (`lm.peft`); its config's `init_from`
(`ABSOLUTE_DIR:STEP`) points to the base, and `restore` reads both and returns the one tree the model applies.

Orbax writes a step into a temporary directory and renames it when every item is complete, and removes leftover
temporary directories on start, so a checkpoint that was being written when the process died is never restored.
Saving is asynchronous: the train loop continues while the arrays are written.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from absl import logging
import jax
import ml_collections
import optax
import orbax.checkpoint as ocp

from lm import config as lm_config
from lm import paths
from lm import peft
from lm import sharding as sharding_lib
from lm.errors import CheckpointError, LmError

CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "checkpoints_damaged"  # Where a trainer moves checkpoints it cannot read (nothing is deleted).


def workdir_and_step(spec: str) -> tuple[str, int | None]:
    """`DIR:STEP` -> `(DIR, STEP)`; `DIR` -> `(DIR, None)` (the form of `config.init_from` for an lm workdir)."""
    path, _, step = spec.rpartition(":")
    return (path, int(step)) if path and step.isdigit() else (spec, None)


def manager(workdir: str, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(
        paths.resolve(workdir, CHECKPOINT_DIR), options=options,
        item_names=("state", "data", "config"))


def save(checkpoints: ocp.CheckpointManager, step: int, state, data_iterator, config) -> None:
    """Starts an asynchronous save of step `step` (returns before the arrays are written); every process calls it.

    `data_iterator` (a `BatchIterator`) has its state read now, by each process for its own shard; None for a run
    whose inputs are a function of the step (PPO's rollouts, `lm.rl`): no `data` item."""
    import grain  # Here, not at the top: programs that only read weights (and the GPU check) run without grain.

    items = dict(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(lm_config.to_dict(config)))
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    checkpoints.save(step, args=ocp.args.Composite(**items), force=True)


def save_weights(workdir: str, step: int, params, config) -> None:
    """Writes a weights-only checkpoint of `step` and waits for it (an imported model, `lm.hf`): `state` holds
    `{"params": params}` and there is no data position, so `restore` reads it but a trainer cannot resume it."""
    checkpoints = manager(workdir, async_save=False)
    try:
        checkpoints.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": params}),
            config=ocp.args.JsonSave(lm_config.to_dict(config))), force=True)
        checkpoints.wait_until_finished()
    finally:
        checkpoints.close()


def restore_latest_state(checkpoints: ocp.CheckpointManager, abstract_state, data_iterator):
    """The newest checkpoint that can be read, restored for resuming: `(step, state)`, or None without checkpoints.

    `state` is restored into the shardings of `abstract_state` (ShapeDtypeStructs) and `data_iterator` (None: a run
    without one, `save`) is set to the saved position of this process's data. A newer checkpoint that cannot be read (a file missing or truncated) is
    reported and moved aside to `workdir/checkpoints_damaged/` once an older one has been restored, so the run can
    save that step again; nothing is deleted. Raises CheckpointError (or the data's IteratorStateError) when the
    config does not fit the checkpoints.
    """
    import grain

    steps = checkpoints.all_steps()
    if not steps:
        return None

    def restore_one(step):
        items = dict(state=ocp.args.StandardRestore(abstract_state))
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            return checkpoints.restore(step, args=ocp.args.Composite(**items)).state
        except ValueError as error:
            if "process_" not in str(error) or isinstance(error, LmError):
                raise
            raise CheckpointError(
                f"checkpoint {step} holds no data state for process {jax.process_index()} of "
                f"{jax.process_count()}: it was saved by another number of processes; resume with the process count "
                f"it was saved with") from None

    step, state, damaged = _newest_restorable(checkpoints, steps, restore_one)
    if damaged and jax.process_index() == 0:
        for damaged_step in damaged:
            _move_aside(checkpoints, damaged_step)
        checkpoints.reload()
    return step, state


def _newest_restorable(checkpoints: ocp.CheckpointManager, steps, restore_one):
    """`(step, restored, damaged steps)`: `restore_one(step)` of the newest of `steps` it succeeds on. An lm error
    (the config does not fit) is raised at once; any other failure means the checkpoint cannot be read."""
    damaged, reasons = [], []
    for step in sorted(steps, reverse=True):
        try:
            return step, restore_one(step), damaged
        except LmError:
            raise
        except Exception as error:  # orbax / tensorstore / JSON errors of missing or truncated files.
            reason = " ".join(str(error).split())[:160] or type(error).__name__
            logging.warning("checkpoint %d in %s cannot be read (%s); trying an older one", step,
                            checkpoints.directory, reason)
            damaged.append(step)
            reasons.append(f"step {step}: {reason}")
    raise CheckpointError(f"no checkpoint in {checkpoints.directory} can be read with this config ({'; '.join(reasons)})")


def _move_aside(checkpoints: ocp.CheckpointManager, step: int) -> None:
    """Moves step `step`'s directory to `workdir/checkpoints_damaged/<step>` (`<step>.1`, ... if taken)."""
    source = checkpoints.directory / str(step)
    target_dir = checkpoints.directory.parent / DAMAGED_DIR
    target_dir.mkdir(exist_ok=True)
    target = target_dir / str(step)
    suffix = 0
    while target.exists():
        suffix += 1
        target = target_dir / f"{step}.{suffix}"
    source.rename(target)
    logging.warning("moved the unreadable checkpoint %d to %s", step, target)


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
      optimizer: the run's optimizer (`lm.optim.make_optimizer(config)`) to also read its state (of the trainable
        parameters), placed by the ZeRO stage; None reads only the parameters.

    A PEFT run's adapters are read from its checkpoint and its base from `config.init_from` (module docstring); the
    parameters returned are the two combined.

    Without `step`, a latest checkpoint that cannot be read (a file missing or truncated) is reported and the newest
    readable one is used.

    Raises:
      CheckpointError: the workdir or checkpoints are missing, `step` is not kept or cannot be read, or `config`'s
        parameters do not match the checkpoint's; the message says which.
    """
    checkpoints = _reader(workdir)
    try:
        config = lm_config.read_config(workdir) if config is None else config
        steps = checkpoints.all_steps()
        if step is not None and step not in steps:
            raise CheckpointError(f"step {step} is not among the checkpoints kept in {workdir}: {sorted(steps)}")
        mesh = sharding_lib.default_mesh(config) if mesh is None else mesh
        shardings = sharding_lib.model_shardings(config, mesh, optimizer)
        # The checkpoint holds the trainable parameters: all of them, or a PEFT run's adapters.
        target = {"params": sharding_lib.abstract_arrays(shardings.abstract_trainable, shardings.trainable)}
        if optimizer is not None:
            target["opt_state"] = sharding_lib.abstract_arrays(
                jax.eval_shape(optimizer.init, target["params"]), shardings.opt_state)

        def restore_one(step):
            metadata = checkpoints.item_metadata(step).state
            if metadata is None:  # Unreadable metadata: a damaged checkpoint, not a config that does not fit.
                raise FileNotFoundError(f"checkpoint {step} has no readable state metadata")
            _check_shapes(metadata, {"params": target["params"]}, workdir, step)
            return checkpoints.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True))).state

        step, state, _ = _newest_restorable(checkpoints, steps if step is None else [step], restore_one)
    finally:
        checkpoints.close()
    params = state["params"]
    if peft.is_peft(config):
        base_dir, base_step = workdir_and_step(config.init_from)
        params = peft.combine(restore(base_dir, base_step, mesh, config=peft.base_config(config)).params, params)
    return Restored(config, params, step, shardings, state.get("opt_state"))


def _reader(workdir: str) -> ocp.CheckpointManager:
    """A manager over `workdir/checkpoints` for reading (it never saves).

    Raises CheckpointError unless the directory holds a complete checkpoint."""
    if not paths.resolve(workdir).exists():
        raise CheckpointError(f"workdir {workdir!r} does not exist")
    if not paths.resolve(workdir).is_dir():
        raise CheckpointError(f"workdir {workdir!r} is a file, not a directory")
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
