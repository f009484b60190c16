"""Forward-pass smoke benchmark: builds a config's model, runs the jitted forward on random tokens, prints figures.

    python -m lm.bench.model --config=configs/tiny.py [--config.model.num_layers=2] [--steps=5]

Prints the parameter count (counted from the config and from the initialised tree), FLOPs per token, and the
measured forward time and tokens per second (median of `--steps` runs after one warm-up run).
"""

import time

from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from lm import cli
from lm import config as lm_config
from lm import flops
from lm import model as model_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed forward passes.")


def main(argv):
    del argv
    config = lm_config.validate(_CONFIG.value)
    model = model_lib.build(config)
    params = jax.jit(lambda rng: nn.unbox(model_lib.init(model, rng)))(jax.random.key(config.seed))
    initialised = sum(leaf.size for leaf in jax.tree.leaves(params))
    batch_size, seq_len = config.data.batch_size, config.data.seq_len
    tokens_bt = jax.random.randint(jax.random.key(1), (batch_size, seq_len), 0, config.model.vocab_size)
    forward = jax.jit(lambda p, t: model.apply({"params": p}, t))
    hidden_btd = forward(params, tokens_bt).block_until_ready()  # Warm-up (compile).
    times = []
    for _ in range(_STEPS.value):
        start = time.perf_counter()
        forward(params, tokens_bt).block_until_ready()
        times.append(time.perf_counter() - start)
    step_seconds = float(np.median(times))
    print(f"parameters: {flops.param_count(config):,} from the config, {initialised:,} initialised")
    print(f"train FLOPs per token (seq_len {seq_len}): {flops.train_flops_per_token(config, seq_len):.3e}")
    print(f"hidden states: {hidden_btd.shape} {hidden_btd.dtype}, finite: {bool(jnp.isfinite(hidden_btd).all())}")
    print(f"forward: {step_seconds * 1e3:.1f} ms per batch of {batch_size}x{seq_len} "
          f"({batch_size * seq_len / step_seconds:,.0f} tokens/s) on {jax.devices()[0].device_kind}")


if __name__ == "__main__":
    cli.run(main)
