"""Steady-state training throughput and MFU for a config, and what the trainer itself logs for it.

    python -m lm.bench.train --config=configs/tiny.py [--steps=20] [--trainer_steps=60] [--config.field=value ...]
    python -m lm.bench.train --config=configs/gpt2_124m.py --config.model.dtype=bfloat16 --trainer_steps=0  # a GPU

Runs the real sharded train step (`lm.train_step`) on `source=synthetic` batches: one warm-up step (compile), then
the median of `--steps` timed steps, each waited for. MFU = train FLOPs per token (lm.flops) x tokens/s / peak FLOP/s
of the devices in use (datasheet bf16 peak on accelerators; on CPU a matmul peak measured in the same process,
labelled so).

Then, in the same process, `lm.train.train` runs the config as it is (its own data source) for `--trainer_steps`
steps in a temporary workdir, and the median of the tokens/s it logs (`metrics.jsonl`, one value per `log_every`
steps, the first interval with the compile left out) is printed beside the benchmark's, with their ratio: the
trainer's loop (data, host one step ahead, logging) should cost nothing the step itself does not.
"""

import contextlib
import io
import statistics
import tempfile
import time

from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from lm import cli
from lm import flops
from lm import metrics as metrics_lib
from lm import train as train_lib
from lm import train_step as train_step_lib
from lm.data import pipeline

def step_tokens_per_second(config, steps: int) -> tuple[float, float, dict, jax.sharding.Mesh]:
    """(median step time, tokens/s, last metrics, mesh) of the train step on synthetic batches of `config`'s
    shape, over `steps` steps after a compile step."""
    config = config.copy_and_resolve_references()
    config.data.source = "synthetic"
    training = train_step_lib.build(config)
    state = training.init_state()
    step = training.train_step()
    iterator = pipeline.make_train_iterator(config, tokenizer=None)
    batches = [pipeline.to_global_arrays(next(iterator), training.shardings.batch) for _ in range(steps + 1)]
    state, metrics = step(state, batches[0], {})
    jax.block_until_ready(metrics)
    times = []
    for batch in batches[1:]:
        start = time.perf_counter()
        state, metrics = step(state, batch, {})
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step_time = float(np.median(times))
    return step_time, config.data.batch_size * config.data.seq_len / step_time, metrics, training.mesh


def trainer_tokens_per_second(config, steps: int) -> tuple[float, int]:
    """(median logged tokens/s, number of intervals) of `lm.train.train` running `config` for `steps` steps."""
    config = config.copy_and_resolve_references()
    config.total_steps, config.log_every = steps, min(config.log_every, steps // 3)
    config.eval_every = config.checkpoint_every = steps  # Evaluation time is not counted in tokens/s anyway.
    config.eval_steps = 1
    with tempfile.TemporaryDirectory() as workdir, contextlib.redirect_stdout(io.StringIO()):
        train_lib.train(config, workdir)
        rates = [m["tokens_per_sec"] for m in metrics_lib.read(workdir) if "tokens_per_sec" in m][1:]
    return statistics.median(rates), len(rates)


def define_flags() -> None:
    """Defined only when run as a program, so `lm.bench.data` can import this module."""
    config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file.")
    flags.DEFINE_integer("steps", 20, "Timed steps after the warm-up step.")
    flags.DEFINE_integer("trainer_steps", 60, "Steps of lm.train.train whose logged tokens/s are compared (0: skip).")


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    config = FLAGS.config
    step_time, tokens_per_sec, metrics, mesh = step_tokens_per_second(config, FLAGS.steps)
    flops_per_token = flops.train_flops_per_token(config, config.data.seq_len)
    peak, peak_label = flops.peak_flops(jax.devices(), config.model.dtype)
    print(f"devices: {len(jax.devices())} x {jax.devices()[0].device_kind}; mesh {dict(mesh.shape)}; "
          f"dtype {config.model.dtype}; attention {config.model.attention}; remat {config.model.remat_policy}")
    print(f"parameters {flops.param_count(config):,}; batch {config.data.batch_size} x {config.data.seq_len}; "
          f"{flops_per_token:.3e} train FLOPs per token")
    print(f"step time {step_time * 1e3:.1f} ms (median of {FLAGS.steps}), {tokens_per_sec:,.0f} tokens/s, "
          f"MFU {100 * flops.mfu(flops_per_token, tokens_per_sec, peak):.1f}% of {peak / 1e12:.3f} TFLOP/s "
          f"({peak_label}); loss {float(metrics['loss']):.3f}")
    if FLAGS.trainer_steps:
        trainer_rate, intervals = trainer_tokens_per_second(config, FLAGS.trainer_steps)
        print(f"lm.train.train on source={config.data.source}, {FLAGS.trainer_steps} steps: {trainer_rate:,.0f} "
              f"tokens/s (median of {intervals} logged intervals); trainer / benchmark = "
              f"{trainer_rate / tokens_per_sec:.3f}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
