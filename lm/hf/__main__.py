"""`python -m lm.hf import|export`: Hugging Face model directories in and out of lm workdirs (`lm.hf.convert`).

    python -m lm.hf import --hf=DIR_OR_HUB_ID --workdir=W [--config.model.dtype=float32 --config.mesh.tensor=2 ...]
    python -m lm.hf export --workdir=W [--step=N] --out=DIR [--max_shard_gb=5] [--adapter]

`export` of a LoRA run writes the merged model, or with `--adapter` the adapters alone in PEFT's format.
"""

from __future__ import annotations

import time

from absl import flags
import jax
from ml_collections import config_flags

from lm import config as lm_config
from lm.errors import ArgumentError
from lm.hf import convert

COMMANDS = ("import", "export")


def define_flags() -> None:
    flags.DEFINE_string("hf", None, "import: a Hugging Face model directory, or a hub id (downloaded when online).")
    flags.DEFINE_string("workdir", None, "import: the lm workdir to write; export: the run to read.")
    flags.DEFINE_string("out", None, "export: the Hugging Face model directory to write (new or empty).")
    flags.DEFINE_integer("step", None, "export: checkpoint step (default: the latest).")
    flags.DEFINE_float("max_shard_gb", 5.0, "export: largest safetensors file, in GB (2**30 bytes).")
    flags.DEFINE_bool("adapter", False, "export: a LoRA run's adapters alone, in PEFT's format (adapter_config.json, "
                      "adapter_model.safetensors), instead of the merged model.")
    config_flags.DEFINE_config_dict(
        "config", lm_config.base_config(), "import: overrides of the config derived from the model's config.json.")


def _required(name: str, command: str) -> str:
    value = flags.FLAGS[name].value
    if not value:
        raise ArgumentError(f"python -m lm.hf {command} needs --{name}")
    return value


def main(argv):
    commands = argv[1:]
    if len(commands) != 1 or commands[0] not in COMMANDS:
        raise ArgumentError(f"usage: python -m lm.hf import|export [flags]; got {' '.join(commands) or 'no command'}")
    FLAGS = flags.FLAGS
    started = time.perf_counter()
    if commands[0] == "import":
        source, workdir = _required("hf", "import"), _required("workdir", "import")
        overrides = config_flags.get_override_values(FLAGS["config"])
        config = convert.import_checkpoint(source, workdir, overrides)
        if jax.process_index() == 0:
            m = config.model
            print(f"imported {source} into {workdir} in {time.perf_counter() - started:.1f} s: {m.num_layers} layers, "
                  f"d_model {m.d_model}, {m.num_heads}/{m.num_kv_heads} heads, vocab {m.vocab_size}, "
                  f"{m.param_dtype} weights\n{lm_config.to_dict(config)['model']}", flush=True)
        return
    workdir, out = _required("workdir", "export"), _required("out", "export")
    if FLAGS.max_shard_gb <= 0:
        raise ArgumentError(f"--max_shard_gb={FLAGS.max_shard_gb} must be positive")
    if FLAGS.adapter:
        files = convert.export_adapter(workdir, out, FLAGS.step)
    else:
        files = convert.export_checkpoint(workdir, out, FLAGS.step, max_shard_bytes=int(FLAGS.max_shard_gb * 2**30))
    if jax.process_index() == 0:
        print(f"exported {workdir} to {out} in {time.perf_counter() - started:.1f} s: {', '.join(files)}", flush=True)


if __name__ == "__main__":
    from lm import cli

    define_flags()
    cli.run(main)
