"""The training program.

    python -m lm.train --config=configs/tiny.py --workdir=workdirs/tiny [--config.a.b=value ...]

Reads top to bottom as: build the run (validate the config against the devices; mesh, model, optimizer,
shardings), open the data and its tokenizer, restore the latest complete checkpoint (or initialise), then loop:
next batch -> jitted step -> log, evaluate, checkpoint. A workdir that already holds checkpoints is resumed exactly
(parameters, optimizer state, step and data position); SIGTERM saves a checkpoint at the current step and exits 0.

The host runs one step ahead of the device: after dispatching step s it reads the non-finite guard's counter of
step s - 1 (`lm.optim`), so reading it never waits for the step just queued. Logging, evaluation and checkpoints
wait for their step, as they must.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import time

from absl import flags
import jax
from jax.experimental import multihost_utils
import numpy as np
import tqdm
from ml_collections import config_flags

from lm import checkpoint
from lm import config as lm_config
from lm import evaluate as evaluate_lib
from lm import flops
from lm import metrics as metrics_lib
from lm import paths
from lm import sharding as sharding_lib
from lm import train_step as train_step_lib
from lm.data import pipeline, sources
from lm.data import tokenizer_training
from lm.errors import NonFiniteError


class _Preemption:
    """SIGTERM, the preemption notice of cloud schedulers; the loop asks `reached(step)` after each step.

    One process: a Python signal handler sets a flag. Several processes: the signal may reach them at different
    steps, and saving is collective, so they must agree on the step: JAX's preemption service (started by
    `jax.distributed.initialize`, which owns SIGTERM then) propagates the notice and names the first step every
    process can still reach.
    """

    def __init__(self):
        self._requested = False
        if jax.process_count() == 1:
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        self._requested = True

    def reached(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self._requested
        return multihost_utils.reached_preemption_sync_point(step)


@dataclasses.dataclass
class _FaultInjection:
    """Test hooks, set only by the CLI's `--debug_*` flags (they are not part of `train()`)."""

    nan_steps: frozenset[int] = frozenset()  # Steps whose batch weights are NaN (a non-finite loss).
    kill_after_save_step: int | None = None  # SIGKILL right after starting this step's asynchronous save.

    def batch(self, step: int, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**batch, "weights": np.full_like(batch["weights"], np.nan)} if step in self.nan_steps else batch

    def saved(self, step: int) -> None:
        if step == self.kill_after_save_step:
            os.kill(os.getpid(), signal.SIGKILL)


_faults = _FaultInjection()


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def train(config, workdir: str, *, print_sharding: bool = False, profile_steps: tuple[int, int] | None = None
          ) -> dict[str, float]:
    """Trains `config` in `workdir` (resuming if it holds checkpoints); returns the last logged metrics.

    `print_sharding` prints the per-leaf sharding table; `profile_steps=(start, stop)` records a jax.profiler trace
    of those steps into `workdir/profile` (the CLI flags of the same names)."""
    training = train_step_lib.build(config)  # Validates; mesh and shapes checked before any compile.
    paths.resolve(workdir).mkdir(parents=True, exist_ok=True)
    lm_config.check_same_model(workdir, config)
    train_split = tokenizer = None  # Synthetic data has neither.
    if config.data.source != "synthetic":
        train_split = sources.resolve(config, config.data.train_split)
        tokenizer = tokenizer_training.get_or_train(config, train_split, workdir=workdir)
    evaluator = evaluate_lib.Evaluator(config, training.shardings, tokenizer, model=training.model)
    with contextlib.ExitStack() as resources:
        data = resources.enter_context(contextlib.closing(
            pipeline.make_train_iterator(config, tokenizer=tokenizer, split=train_split)))
        if jax.process_index() == 0:
            lm_config.write_config(workdir, config)
        abstract_state = training.abstract_state()
        _describe(training, abstract_state, print_sharding)
        checkpoints = resources.enter_context(contextlib.closing(checkpoint.manager(workdir, config.keep_checkpoints)))
        latest = checkpoints.latest_step()
        if latest is None:
            state = training.init_state()
        else:
            state = checkpoint.restore_state(checkpoints, latest, abstract_state, data)
            _log(f"resumed from step {latest}")
        writer = resources.enter_context(contextlib.closing(metrics_lib.MetricsWriter(workdir, int(state.step))))
        progress = resources.enter_context(tqdm.tqdm(
            total=config.total_steps, initial=int(state.step), disable=jax.process_index() != 0, dynamic_ncols=True,
            file=sys.stdout))
        last, finished = _loop(training, state, data, checkpoints, evaluator, writer, progress, workdir,
                               profile_steps)
    if finished and "eval_unigram_entropy" in last:
        loss, entropy = last["eval_loss"], last["eval_unigram_entropy"]
        _log(f"final eval loss {loss:.4f} nats/token vs unigram entropy of the validation tokens {entropy:.4f}: "
             f"{100 * (1 - loss / entropy):.1f}% below")
    return last


def _describe(training: train_step_lib.Training, abstract_state, print_sharding: bool) -> None:
    config, mesh = training.config, training.mesh
    _log(f"config:\n{json.dumps(lm_config.to_dict(config), indent=1, sort_keys=True)}")
    _log(f"mesh: {dict(mesh.shape)} over {mesh.size} {jax.devices()[0].device_kind} devices, "
         f"{jax.process_count()} process(es)")
    _log(f"parameters: {flops.param_count(config):,}; ZeRO stage {config.sharding.zero_stage}")
    if print_sharding:
        _log(sharding_lib.sharding_table(abstract_state, "train state sharding"))
    else:
        state_bytes = sharding_lib.bytes_per_device(abstract_state, train_step_lib.state_shardings(training.shardings))
        _log(f"train state: {state_bytes:,} bytes per device (--print_sharding for the table)")


def _loop(training, state, data, checkpoints, evaluator, writer, progress, workdir, profile_steps
          ) -> tuple[dict[str, float], bool]:
    """Steps from `state.step + 1` to `config.total_steps` (module docstring); returns the last logged metrics and
    whether the run got to its end (False: stopped by SIGTERM)."""
    config, batch_sharding = training.config, training.shardings.batch
    step_fn = training.train_step()
    flops_per_token = flops.train_flops_per_token(config, config.data.seq_len)
    peak, peak_label = flops.peak_flops(jax.devices(), config.model.dtype)
    _log(f"MFU against {peak / 1e12:.3f} TFLOP/s ({peak_label}); {flops_per_token:.3e} train FLOPs per token")
    preemption = _Preemption()
    last, previous = {}, None
    interval_start, interval_steps = time.perf_counter(), 0
    for step in range(int(state.step) + 1, config.total_steps + 1):
        if profile_steps and step == profile_steps[0]:
            jax.profiler.start_trace(os.path.join(workdir, "profile"))
        state, metrics = step_fn(state, pipeline.to_global_arrays(_faults.batch(step, next(data)), batch_sharding))
        if previous is not None:
            _check_finite(*previous, config, checkpoints)  # Step - 1's counter: this step is already queued.
        previous = (step, metrics)
        if profile_steps and step == profile_steps[1]:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
        interval_steps += 1
        progress.update(1)
        if step % config.log_every == 0 or step == config.total_steps:
            last = {k: float(v) for k, v in jax.device_get(metrics).items()}  # Waits for this step to finish.
            elapsed = time.perf_counter() - interval_start
            tokens_per_sec = interval_steps * config.data.batch_size * config.data.seq_len / elapsed
            last.update(tokens_per_sec=tokens_per_sec, step_time=elapsed / interval_steps,
                        mfu=flops.mfu(flops_per_token, tokens_per_sec, peak))
            writer.write(step, last)
            progress.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{tokens_per_sec:,.0f}")
            interval_start, interval_steps = time.perf_counter(), 0
        if step % config.eval_every == 0 or step == config.total_steps:
            eval_metrics = {f"eval_{name}": value for name, value in evaluator(state.params).items()}
            writer.write(step, eval_metrics)
            last.update(eval_metrics)
            progress.write(f"step {step}: eval loss {eval_metrics['eval_loss']:.4f}, "
                           f"perplexity {eval_metrics['eval_perplexity']:.2f}")
            interval_start, interval_steps = time.perf_counter(), 0  # Evaluation time is not training time.
        preempted = preemption.reached(step)
        if preempted or step % config.checkpoint_every == 0 or step == config.total_steps:
            checkpoint.save(checkpoints, step, state, data, config)
            _faults.saved(step)
        if preempted:
            checkpoints.wait_until_finished()
            _log(f"SIGTERM: saved a checkpoint at step {step}, exiting")
            return last, False
    if previous is not None:
        _check_finite(*previous, config, checkpoints)
    return last, True


def _check_finite(step: int, metrics: dict, config, checkpoints) -> None:
    """Reports a skipped (non-finite) step and stops the run after `config.max_consecutive_skips` in a row, before
    optax would give up and apply one (`lm.optim`)."""
    if not float(metrics["skipped"]):
        return
    consecutive = int(metrics["consecutive_skips"])
    _log(f"step {step}: non-finite loss or gradient norm, update skipped ({consecutive} in a row)")
    if consecutive >= config.max_consecutive_skips:
        checkpoints.wait_until_finished()
        raise NonFiniteError(
            f"stopping: {consecutive} consecutive steps had a non-finite loss or gradient norm "
            f"(config.max_consecutive_skips={config.max_consecutive_skips}); the last good checkpoint is step "
            f"{checkpoints.latest_step()}")


def define_flags() -> None:
    """The CLI's flags; defined only when run as a program, so importing this module defines none."""
    config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py).", lock_config=True)
    flags.mark_flag_as_required("config")
    flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, config.", required=True)
    flags.DEFINE_bool("print_sharding", False, "Print the full per-leaf sharding table.")
    flags.DEFINE_string(
        "profile_steps", "", "START:STOP records a jax.profiler trace of those steps into WORKDIR/profile.")
    flags.DEFINE_list(
        "debug_nan_steps", [], "Test hook: steps whose batch weights are set to NaN (a non-finite loss).")
    flags.DEFINE_integer(
        "debug_kill_after_save_step", None, "Test hook: SIGKILL this process right after starting the async save "
        "of this step (a kill while a checkpoint is being written).")


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    _faults.nan_steps = frozenset(int(s) for s in FLAGS.debug_nan_steps)
    _faults.kill_after_save_step = FLAGS.debug_kill_after_save_step
    profile_steps = tuple(int(s) for s in FLAGS.profile_steps.split(":")) if FLAGS.profile_steps else None
    train(FLAGS.config, FLAGS.workdir, print_sharding=FLAGS.print_sharding, profile_steps=profile_steps)


if __name__ == "__main__":
    from lm import cli

    define_flags()
    cli.run(main)
