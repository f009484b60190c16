"""Steady-state training throughput and MFU for a config on synthetic data.

    python -m lm.bench.train --config=configs/tiny.py [--steps=20] [--config.field=value ...]
    python -m lm.bench.train --config=configs/gpt2_124m.py --config.model.dtype=bfloat16   # on a GPU

Runs the real sharded train step (`lm.train_step`) on `source=synthetic` batches: one warm-up step (compile), then
the median of `--steps` timed steps. MFU = train FLOPs per token (lm.flops) x tokens/s / peak FLOP/s of the devices
in use (datasheet bf16 peak on accelerators; on CPU a matmul peak measured in the same process, labelled so).
"""

import time

from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from lm import cli
from lm import flops
from lm import train_step as train_step_lib
from lm.data import pipeline

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps after the warm-up step.")


def main(argv):
    del argv
    config = _CONFIG.value
    config.data.source = "synthetic"
    training = train_step_lib.build(config)
    state = training.init_state()
    step = training.train_step()
    iterator = pipeline.make_train_iterator(config, tokenizer=None)
    batches = [pipeline.to_global_arrays(next(iterator), training.shardings.batch) for _ in range(_STEPS.value + 1)]
    state, metrics = step(state, batches[0])
    jax.block_until_ready(metrics)
    times = []
    for batch in batches[1:]:
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step_time = float(np.median(times))
    tokens_per_sec = config.data.batch_size * config.data.seq_len / step_time
    flops_per_token = flops.train_flops_per_token(config, config.data.seq_len)
    peak, peak_label = flops.peak_flops(jax.devices(), config.model.dtype)
    print(f"devices: {len(jax.devices())} x {jax.devices()[0].device_kind}; mesh {dict(training.mesh.shape)}; "
          f"dtype {config.model.dtype}; attention {config.model.attention}; remat {config.model.remat_policy}")
    print(f"parameters {flops.param_count(config):,}; batch {config.data.batch_size} x {config.data.seq_len}; "
          f"{flops_per_token:.3e} train FLOPs per token")
    print(f"step time {step_time * 1e3:.1f} ms (median of {len(times)}), {tokens_per_sec:,.0f} tokens/s, "
          f"MFU {100 * flops.mfu(flops_per_token, tokens_per_sec, peak):.1f}% of {peak / 1e12:.3f} TFLOP/s "
          f"({peak_label}); loss {float(metrics['loss']):.3f}")


if __name__ == "__main__":
    cli.run(main)
