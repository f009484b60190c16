"""Per-device memory of parameters, gradients and optimizer state for each ZeRO stage, without allocating anything.

    python -m lm.bench.sharding [--config=configs/llama_8b.py] [--devices=64] [--config.mesh.fsdp=...]

The mesh is `config.mesh` over `--devices` devices (data=1, fsdp=-1, tensor=1 unless overridden). The figures come
from the pre-flight's abstract evaluation (`lm.preflight.estimate`): no device, real or simulated, is needed.
`python -m lm.preflight` adds activations, FLOPs and step time for a named device kind.
"""

from absl import flags
import jax
from ml_collections import config_flags

from lm import cli
from lm import preflight

_CONFIG = config_flags.DEFINE_config_file("config", "configs/llama_8b.py", "Config file.")
_DEVICES = flags.DEFINE_integer("devices", 64, "Number of devices in the mesh.")


def main(argv):
    del argv
    jax.config.update("jax_platforms", "cpu")
    config = _CONFIG.value
    if config.mesh.data == 1 and config.mesh.tensor == 1:
        config.mesh.fsdp = -1
    result = preflight.estimate(config, preflight.mesh_sizes(config.mesh, _DEVICES.value))
    print(f"{config.model.num_layers}-layer model, {result.parameters:,} parameters ({config.model.param_dtype}), "
          f"optimizer {config.optim.optimizer}, mesh {result.mesh}")
    print(preflight.stage_table(result))


if __name__ == "__main__":
    cli.run(main)
