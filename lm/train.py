"""The training program.

    python -m lm.train --config=configs/tiny.py --workdir=workdirs/tiny [--config.a.b=value ...]

Reads top to bottom as: build the run (validate the config against the devices; mesh, model, optimizer,
shardings), open the data and its tokenizer, restore the latest complete checkpoint (or initialise: randomly, or
from `config.init_from`, `lm/init_from.py`), then loop:
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
import orbax.checkpoint as ocp
import tqdm
from ml_collections import config_flags

from lm import attention
from lm import checkpoint
from lm import config as lm_config
from lm import evaluate as evaluate_lib
from lm import flops
from lm import init_from as init_from_lib
from lm import metrics as metrics_lib
from lm import peft
from lm import sharding as sharding_lib
from lm import train_step as train_step_lib
from lm import workdir as workdir_lib
from lm.data import pipeline, sources
from lm.data import tokenizer_training
from lm.errors import ArgumentError, CheckpointError, ConfigError, NonFiniteError
from lm.hf import convert as hf_convert


class _Preemption:
    """SIGTERM (the preemption notice of cloud schedulers) and SIGINT (Ctrl-C) ask the run to save and stop; the loop
    asks `reached(step)` after each step. A second Ctrl-C raises KeyboardInterrupt at once. Used as a context
    manager, which puts the previous signal handlers back.

    One process: Python signal handlers set a flag. Several processes: the signal may reach them at different steps,
    and saving is collective, so they must agree on the step: JAX's preemption service (started by
    `jax.distributed.initialize`, which owns SIGTERM then) propagates the notice and names the first step every
    process can still reach.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    # The CLI ends the process on a second Ctrl-C (pending asynchronous saves are abandoned: orbax never commits a
    # partial one); called from Python, `train` raises KeyboardInterrupt and unwinds, closing what it opened.
    end_process_on_second_interrupt = False

    def __init__(self):
        self._requested = None
        self._previous = {}

    def __enter__(self) -> "_Preemption":
        if jax.process_count() == 1:
            self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        del frame
        if self._requested is not None and signum == signal.SIGINT:  # A second Ctrl-C: stop now, without a save.
            if self.end_process_on_second_interrupt:
                print("error: interrupted", file=sys.stderr, flush=True)
                sys.stdout.flush()
                os._exit(130)
            raise KeyboardInterrupt
        self._requested = signal.Signals(signum).name
        _log(f"{self._requested}: saving a checkpoint after this step, then exiting (Ctrl-C again: now)")

    def reached(self, step: int) -> str | None:
        """The signal's name once a stop was asked for at or before `step`, else None."""
        if jax.process_count() == 1:
            return self._requested
        return "SIGTERM" if multihost_utils.reached_preemption_sync_point(step) else None


@dataclasses.dataclass
class _FaultInjection:
    """Test hooks, set only by the CLI's `--debug_*` flags (they are not part of `train()`)."""

    nan_steps: frozenset[int] = frozenset()  # Steps whose batch weights are NaN (a non-finite loss).
    kill_after_save_step: int | None = None  # SIGKILL right after starting this step's asynchronous save.
    fail_at_step: int | None = None  # An unexpected error (RuntimeError) as this step starts.

    def starting(self, step: int) -> None:
        if step == self.fail_at_step:
            raise RuntimeError(f"injected failure at step {step} (--debug_fail_at_step)")

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

    Everything that can be checked is checked before anything in the workdir changes: the config against the devices,
    the workdir's lock, its model and checkpoints, the data, tokenizer and evaluation split. `print_sharding` prints
    the per-leaf sharding table; `profile_steps=(start, stop)` records a jax.profiler trace of those steps into
    `workdir/profile` (the CLI flags of the same names)."""
    config = init_from_lib.with_source_model(config)
    if config.finetune.objective == "ppo":
        raise ConfigError("config.finetune.objective='ppo' learns from rollouts: run it with python -m lm.rl")
    training = train_step_lib.build(config)  # Validates; mesh and shapes checked before any compile.
    workdir_lib.ensure_directory(workdir)
    if hf_convert.is_imported(workdir):
        raise CheckpointError(f"{workdir} holds a model imported from Hugging Face (weights only, nothing to resume): "
                              f"train from it with --config.init_from={workdir} and a new --workdir")
    with contextlib.ExitStack() as resources:
        resources.enter_context(workdir_lib.WorkdirLock(workdir))
        preemption = resources.enter_context(_Preemption())
        lm_config.check_same_model(workdir, config)
        train_split = tokenizer = None  # Synthetic data has neither.
        if config.data.source != "synthetic":
            train_split = sources.resolve(config, config.data.train_split)
            tokenizer = tokenizer_training.get_or_train(config, train_split, workdir=workdir)
        evaluator = evaluate_lib.Evaluator(config, training.shardings, tokenizer, model=training.model)
        data = resources.enter_context(contextlib.closing(
            pipeline.make_train_iterator(config, tokenizer=tokenizer, split=train_split)))
        abstract_state = training.abstract_state()
        _describe(training, abstract_state, print_sharding)
        checkpoints = resources.enter_context(contextlib.closing(checkpoint.manager(workdir, config.keep_checkpoints)))
        restored = checkpoint.restore_latest_state(checkpoints, abstract_state, data)
        # What the step reads but does not train, read again on every start (checkpoints hold the trainable tree):
        # a PEFT run's base (`lm.peft`), full-parameter DPO's or PPO's reference (`lm.dpo`, `lm.rl`), else nothing.
        frozen = {}
        if peft.is_peft(config) or peft.runs_reference_model(config):
            frozen = init_from_lib.initial_params(config, training.shardings)
        if restored is None and config.init_from and not peft.is_peft(config):
            state = training.state_from(init_from_lib.initial_params(config, training.shardings))
            _log(f"initialized from {config.init_from}")
        elif restored is None:
            state = training.init_state()  # Random weights, or a PEFT run's new adapters over its frozen base.
            if peft.is_peft(config):
                _log(f"new {config.finetune.method} adapters over {config.init_from}")
        else:
            step, state = restored
            _log(f"resumed from step {step}")
        if jax.process_index() == 0:  # Only now: the config fits the workdir's checkpoints and data state.
            lm_config.write_config(workdir, config)
        writer = resources.enter_context(contextlib.closing(metrics_lib.MetricsWriter(workdir, int(state.step))))
        progress = resources.enter_context(tqdm.tqdm(
            total=config.total_steps, initial=int(state.step), disable=jax.process_index() != 0, dynamic_ncols=True,
            file=sys.stdout))
        run = _Run(training, frozen, data, checkpoints, evaluator, writer, progress, preemption, workdir, profile_steps)
        last, finished = run.loop(state)
    if finished and "eval_unigram_entropy" in last:
        loss, entropy = last["eval_loss"], last["eval_unigram_entropy"]
        gap = 100 * (1 - loss / entropy)
        _log(f"final eval loss {loss:.4f} nats/token vs unigram entropy of the validation tokens {entropy:.4f}: "
             f"{abs(gap):.1f}% {'below' if gap >= 0 else 'above'}")
    return last


def _describe(training: train_step_lib.Training, abstract_state, print_sharding: bool) -> None:
    config, mesh = training.config, training.mesh
    _log(f"config:\n{json.dumps(lm_config.to_dict(config), indent=1, sort_keys=True)}")
    _log(f"mesh: {dict(mesh.shape)} over {mesh.size} {jax.devices()[0].device_kind} devices, "
         f"{jax.process_count()} process(es)")
    _log(f"parameters: {flops.param_count(config):,}; ZeRO stage {config.sharding.zero_stage}")
    if peft.is_peft(config):
        _log(f"{config.finetune.method} adapters: {peft.count(training.shardings.abstract_trainable):,} trainable "
             f"parameters over the frozen base {config.init_from}")
    if print_sharding:
        _log(sharding_lib.sharding_table(abstract_state, "train state sharding"))
    else:
        state_bytes = sharding_lib.bytes_per_device(abstract_state, train_step_lib.state_shardings(training.shardings))
        _log(f"train state: {state_bytes:,} bytes per device (--print_sharding for the table)")


@dataclasses.dataclass
class _Run:
    """What the loop reads and writes; `train` builds one and calls `loop`."""

    training: train_step_lib.Training
    frozen: dict  # The step's frozen parameters: a PEFT run's base, else {}.
    data: pipeline.BatchIterator
    checkpoints: ocp.CheckpointManager
    evaluator: evaluate_lib.Evaluator
    writer: metrics_lib.MetricsWriter
    progress: tqdm.tqdm
    preemption: _Preemption
    workdir: str
    profile_steps: tuple[int, int] | None
    state: train_step_lib.TrainState | None = None  # The latest state, for a save after an unexpected error.

    def loop(self, state) -> tuple[dict[str, float], bool]:
        """Steps from `state.step + 1` to `config.total_steps` (module docstring); returns the last logged metrics
        and whether the run got to its end (False: a signal stopped it). An unexpected error first saves the last
        completed step, where the data position matches it, then propagates."""
        self.state = state
        try:
            return self._steps()
        except NonFiniteError:
            raise  # The state may hold the update that gave up; the last good checkpoint is on disk.
        except Exception:
            self._save_after_error()
            raise

    def _steps(self) -> tuple[dict[str, float], bool]:
        config, batch_sharding = self.training.config, self.training.shardings.batch
        step_fn = self.training.train_step()
        flops_per_token = flops.train_flops_per_token(config, config.data.seq_len)
        peak, peak_label = flops.peak_flops(jax.devices(), config.model.dtype)
        _log(f"MFU against {peak / 1e12:.3f} TFLOP/s ({peak_label}); {flops_per_token:.3e} train FLOPs per token")
        last, previous = {}, None
        interval_start, interval_steps = time.perf_counter(), 0
        for step in range(int(self.state.step) + 1, config.total_steps + 1):
            if self.profile_steps and step == self.profile_steps[0]:
                jax.profiler.start_trace(os.path.join(self.workdir, "profile"))
            _faults.starting(step)
            local_batch = _faults.batch(step, next(self.data))
            attention.check_segment_runs(local_batch["segment_ids"], config.model.attention_max_segments)
            batch = pipeline.to_global_arrays(local_batch, batch_sharding)
            self.state, metrics = step_fn(self.state, batch, self.frozen)
            if previous is not None:
                check_finite(*previous, config, self.checkpoints)  # Step - 1's counter: this step is queued.
            previous = (step, metrics)
            if self.profile_steps and step == self.profile_steps[1]:
                jax.block_until_ready(self.state)
                jax.profiler.stop_trace()
            interval_steps += 1
            self.progress.update(1)
            if step % config.log_every == 0 or step == config.total_steps:
                last = {k: float(v) for k, v in jax.device_get(metrics).items()}  # Waits for this step to finish.
                elapsed = time.perf_counter() - interval_start
                tokens_per_sec = interval_steps * config.data.batch_size * config.data.seq_len / elapsed
                last.update(tokens_per_sec=tokens_per_sec, step_time=elapsed / interval_steps,
                            mfu=flops.mfu(flops_per_token, tokens_per_sec, peak))
                self.writer.write(step, last)
                self.progress.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{tokens_per_sec:,.0f}")
                interval_start, interval_steps = time.perf_counter(), 0
            if step % config.eval_every == 0 or step == config.total_steps:
                params = peft.combine(self.frozen, self.state.params)
                results = self.evaluator(params, reference=self.frozen)
                eval_metrics = {f"eval_{name}": value for name, value in results.items()}
                self.writer.write(step, eval_metrics)
                last.update(eval_metrics)
                self.progress.write(evaluate_lib.format_results(step, results) if "pairs" in results else
                                    f"step {step}: eval loss {results['loss']:.4f}, "
                                    f"perplexity {results['perplexity']:.2f}")
                interval_start, interval_steps = time.perf_counter(), 0  # Evaluation time is not training time.
            stop_signal = self.preemption.reached(step)
            if stop_signal or step % config.checkpoint_every == 0 or step == config.total_steps:
                checkpoint.save(self.checkpoints, step, self.state, self.data, config)
                _faults.saved(step)
            if stop_signal:
                self.checkpoints.wait_until_finished()
                _log(f"{stop_signal}: saved a checkpoint at step {step}, exiting")
                return last, False
        if previous is not None:
            check_finite(*previous, config, self.checkpoints)
        return last, True

    def _save_after_error(self) -> None:
        """Saves the latest state if it is whole and the data position belongs to it, and it is not saved yet."""
        try:
            step = int(self.state.step)  # Raises if a failed step had already taken (donated) the state's buffers.
            if step == 0 or self.data.step != step or step in self.checkpoints.all_steps():
                return
            checkpoint.save(self.checkpoints, step, self.state, self.data, self.training.config)
            self.checkpoints.wait_until_finished()
            _log(f"saved a checkpoint at step {step} before stopping on the error below")
        except Exception as error:  # The original error matters more; say why nothing was saved.
            _log(f"could not save the state after the error below ({type(error).__name__}: {error})")


def check_finite(step: int, metrics: dict, config, checkpoints) -> None:
    """Reports a skipped (non-finite) update and stops the run after `config.max_consecutive_skips` in a row, before
    optax would give up and apply one (`lm.optim`). `metrics`: the train step's (`lm.rl` checks each PPO update)."""
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
    flags.DEFINE_integer(
        "debug_fail_at_step", None, "Test hook: raise an unexpected error as this step starts (a crash mid-run).")


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    _Preemption.end_process_on_second_interrupt = True
    _faults.nan_steps = frozenset(int(s) for s in FLAGS.debug_nan_steps)
    _faults.kill_after_save_step = FLAGS.debug_kill_after_save_step
    _faults.fail_at_step = FLAGS.debug_fail_at_step
    profile_steps = None
    if FLAGS.profile_steps:
        start, _, stop = FLAGS.profile_steps.partition(":")
        if not (start.isdigit() and stop.isdigit() and int(start) < int(stop)):
            raise ArgumentError(f"--profile_steps={FLAGS.profile_steps!r} must be START:STOP, two step numbers with "
                                f"START < STOP")
        profile_steps = (int(start), int(stop))
    train(FLAGS.config, FLAGS.workdir, print_sharding=FLAGS.print_sharding, profile_steps=profile_steps)


if __name__ == "__main__":
    from lm import cli

    define_flags()
    cli.run(main)
