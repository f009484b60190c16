"""The training program.

    python -m lm.train --config=configs/tiny.py --workdir=workdirs/tiny [--config.a.b=value ...]

Reads top to bottom as: validate the config and workdir, build the mesh, model, optimizer and shardings, open the
data, restore the latest complete checkpoint (or initialise), then loop: next batch -> jitted step -> log, evaluate,
checkpoint. A workdir that already holds checkpoints is resumed exactly (parameters, optimizer state, step and data
position); SIGTERM saves a checkpoint at the current step and exits 0.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from absl import app, flags, logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import tqdm
from ml_collections import config_flags

from lm import checkpoint
from lm import distributed
from lm import evaluate as evaluate_lib
from lm import config as lm_config
from lm import flops
from lm import metrics as metrics_lib
from lm import paths
from lm import sharding as sharding_lib
from lm import train_step as train_step_lib
from lm.data import pipeline, sources

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


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def unigram_entropy(config, workdir) -> float:
    """Entropy (nats) of the validation targets' unigram distribution over the evaluated batches: the loss of the
    best model that ignores context, the bar a trained model must clear."""
    iterator = pipeline.make_eval_iterator(config, workdir=workdir)
    counts = np.zeros(config.model.vocab_size, np.float64)
    for _ in range(config.eval_steps):
        batch = next(iterator)
        np.add.at(counts, batch["targets"].ravel(), batch["weights"].ravel())
    iterator.close()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def train(config, workdir: str, *, print_sharding: bool = False, profile_steps: tuple[int, int] | None = None,
          debug_nan_steps: frozenset[int] = frozenset(), debug_kill_after_save_step: int | None = None
          ) -> dict[str, float]:
    """Trains `config` in `workdir` (resuming if it holds checkpoints); returns the last logged metrics.

    The keyword options are the CLI flags of the same names (`--profile_steps=START:STOP` is a pair here)."""
    lm_config.validate(config)
    paths.resolve(workdir).mkdir(parents=True, exist_ok=True)
    checkpoint.check_same_model(workdir, config)
    training = train_step_lib.build(config)
    mesh, shardings = training.mesh, training.shardings
    train_iterator = pipeline.make_train_iterator(config, workdir=workdir)  # Data errors surface before compiling.
    if jax.process_index() == 0:
        checkpoint.write_config(workdir, config)

    _log(f"config:\n{json.dumps(checkpoint.config_to_dict(config), indent=1, sort_keys=True)}")
    _log(f"mesh: {dict(mesh.shape)} over {mesh.size} {jax.devices()[0].device_kind} devices, "
         f"{jax.process_count()} process(es)")
    _log(f"parameters: {flops.param_count(config):,}; ZeRO stage {config.sharding.zero_stage}")
    abstract_state = training.abstract_state()
    if print_sharding:
        _log(sharding_lib.sharding_table(abstract_state, "train state sharding"))
    else:
        state_bytes = sharding_lib.bytes_per_device(abstract_state, train_step_lib.state_shardings(shardings))
        _log(f"train state: {state_bytes:,} bytes per device (--print_sharding for the table)")

    checkpoints = checkpoint.manager(workdir, keep=config.keep_checkpoints)
    latest = checkpoints.latest_step()
    if latest is None:
        state = training.init_state()
    else:
        state = checkpoint.restore_state(checkpoints, latest, abstract_state, train_iterator)
        _log(f"resumed from step {latest}")
    start_step = int(state.step)

    step_fn = training.train_step()
    eval_step = training.eval_step()
    writer = metrics_lib.MetricsWriter(workdir, resume_step=start_step)
    flops_per_token = flops.train_flops_per_token(config, config.data.seq_len)
    peak, peak_label = flops.peak_flops(jax.devices(), config.model.dtype)
    _log(f"MFU against {peak / 1e12:.3f} TFLOP/s ({peak_label}); {flops_per_token:.3e} train FLOPs per token")
    preemption = _Preemption()
    tokens_per_step = config.data.batch_size * config.data.seq_len

    def save(step):
        checkpoint.save(checkpoints, step, state, train_iterator, config)
        if debug_kill_after_save_step == step:
            os.kill(os.getpid(), signal.SIGKILL)

    consecutive_skips = skipped_total = 0
    last = {}
    interval_start, interval_steps = time.perf_counter(), 0
    progress = tqdm.tqdm(total=config.total_steps, initial=start_step, disable=jax.process_index() != 0,
                         dynamic_ncols=True, file=sys.stdout)
    for step in range(start_step + 1, config.total_steps + 1):
        batch = next(train_iterator)
        if step in debug_nan_steps:
            batch = {**batch, "weights": np.full_like(batch["weights"], np.nan)}
        if profile_steps and step == profile_steps[0]:
            jax.profiler.start_trace(os.path.join(workdir, "profile"))
        state, metrics = step_fn(state, pipeline.to_global_arrays(batch, shardings.batch))
        if profile_steps and step == profile_steps[1]:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
        interval_steps += 1
        # One scalar read per step: the skip guard needs it, and it keeps the host at most one step ahead.
        skipped = bool(metrics["skipped"])
        consecutive_skips = consecutive_skips + 1 if skipped else 0
        skipped_total += skipped
        if skipped:
            _log(f"step {step}: non-finite loss or gradient norm, update skipped ({consecutive_skips} in a row)")
        if consecutive_skips >= config.max_consecutive_skips:
            checkpoints.wait_until_finished()
            raise SystemExit(
                f"stopping: {consecutive_skips} consecutive steps had a non-finite loss or gradient norm "
                f"(config.max_consecutive_skips={config.max_consecutive_skips}); the last good checkpoint is step "
                f"{checkpoints.latest_step()}")
        progress.update(1)

        if step % config.log_every == 0 or step == config.total_steps:
            elapsed = time.perf_counter() - interval_start
            tokens_per_sec = interval_steps * tokens_per_step / elapsed
            last = {k: float(v) for k, v in jax.device_get(metrics).items()}
            last.update(tokens_per_sec=tokens_per_sec, step_time=elapsed / interval_steps,
                        mfu=flops.mfu(flops_per_token, tokens_per_sec, peak), skipped_total=skipped_total)
            writer.write(step, last)
            progress.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{tokens_per_sec:,.0f}")
            interval_start, interval_steps = time.perf_counter(), 0
        if step % config.eval_every == 0 or step == config.total_steps:
            results = evaluate_lib.evaluate(config, state.params, workdir=workdir, shardings=shardings,
                                            eval_step=eval_step)
            eval_metrics = {f"eval_{name}": value for name, value in results.items()}
            writer.write(step, eval_metrics)
            last.update(eval_metrics)
            progress.write(f"step {step}: eval loss {eval_metrics['eval_loss']:.4f}, "
                           f"perplexity {eval_metrics['eval_perplexity']:.2f}")
            interval_start, interval_steps = time.perf_counter(), 0  # Evaluation time is not training time.
        if preemption.reached(step):
            save(step)
            checkpoints.wait_until_finished()
            _log(f"SIGTERM: saved a checkpoint at step {step}, exiting")
            progress.close()
            writer.close()
            return last
        if step % config.checkpoint_every == 0 or step == config.total_steps:
            save(step)
    progress.close()
    checkpoints.wait_until_finished()
    checkpoints.close()
    writer.close()
    train_iterator.close()
    if "eval_loss" in last and config.data.source != "synthetic":
        entropy = unigram_entropy(config, workdir)
        _log(f"final eval loss {last['eval_loss']:.4f} nats/token vs unigram entropy of the validation tokens "
             f"{entropy:.4f}: {100 * (1 - last['eval_loss'] / entropy):.1f}% below")
    return last


def define_flags() -> None:
    """The CLI's flags; defined only when run as a program, so importing this module defines none."""
    config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py).", lock_config=True)
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
    logging.set_verbosity(logging.WARNING)  # orbax and grain log every save and read at INFO.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow (data code only) startup chatter.
    FLAGS = flags.FLAGS
    if FLAGS.config is None:
        raise app.UsageError("--config=configs/NAME.py is required")
    try:
        distributed.initialize()
        profile_steps = tuple(int(s) for s in FLAGS.profile_steps.split(":")) if FLAGS.profile_steps else None
        train(FLAGS.config, FLAGS.workdir, print_sharding=FLAGS.print_sharding, profile_steps=profile_steps,
              debug_nan_steps=frozenset(int(s) for s in FLAGS.debug_nan_steps),
              debug_kill_after_save_step=FLAGS.debug_kill_after_save_step)
    except (lm_config.ConfigError, checkpoint.CheckpointError, sources.DataError,
            distributed.DistributedError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    define_flags()
    app.run(main)
