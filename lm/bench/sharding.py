"""Per-device memory of parameters, gradients and optimizer state for each ZeRO stage, without allocating anything.

    python -m lm.bench.sharding [--config=configs/llama_8b.py] [--devices=64] [--config.mesh.fsdp=...]

Builds a mesh of `--devices` simulated CPU devices (data=1, fsdp=-1, tensor=1 unless overridden), derives every
sharding from `jax.eval_shape` of the model and optimizer, and prints the bytes one device holds.
"""

import os
import sys

_DEVICES = next((int(a.split("=")[1]) for a in sys.argv if a.startswith("--devices=")), 64)
# Simulated devices must be requested before JAX initialises its CPU backend.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={_DEVICES}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from lm import config as lm_config  # noqa: E402
from lm import flops  # noqa: E402
from lm import model as model_lib  # noqa: E402
from lm import optim  # noqa: E402
from lm import sharding as sharding_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/llama_8b.py", "Config file.")
flags.DEFINE_integer("devices", 64, "Number of simulated devices in the mesh.")

GB = 1e9


def main(argv):
    del argv
    config = _CONFIG.value
    if config.mesh.data == 1 and config.mesh.tensor == 1:
        config.mesh.fsdp = -1
    lm_config.validate(config)
    mesh = sharding_lib.make_mesh(config.mesh)
    model = model_lib.build(config)
    optimizer = optim.make_optimizer(config)
    boxed = jax.eval_shape(lambda: model_lib.init(model, jax.random.key(0)))
    abstract_params = nn.unbox(boxed)
    abstract_state = jax.eval_shape(optimizer.init, abstract_params)
    print(f"{config.model.num_layers}-layer model, {flops.param_count(config):,} parameters "
          f"({config.model.param_dtype}), optimizer {config.optim.optimizer}, mesh {dict(mesh.shape)}")
    print(f"{'stage':>5}  {'params GB':>10}  {'grads GB':>10}  {'opt state GB':>12}  {'total GB':>9}  (per device)")
    for stage in range(4):
        config.sharding.zero_stage = stage
        shardings = sharding_lib.Shardings(config, mesh, boxed, optimizer)
        params = sharding_lib.bytes_per_device(abstract_params, shardings.params)
        grads = sharding_lib.bytes_per_device(abstract_params, shardings.grads)
        state = sharding_lib.bytes_per_device(abstract_state, shardings.opt_state)
        print(f"{stage:>5}  {params / GB:>10.3f}  {grads / GB:>10.3f}  {state / GB:>12.3f}  "
              f"{(params + grads + state) / GB:>9.3f}")


if __name__ == "__main__":
    app.run(main)
