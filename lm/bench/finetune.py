"""Full fine-tuning against LoRA, prefix tuning and LoReFT on the same model and batch: what each trains, the memory
its step needs, and its step time.

    python -m lm.bench.finetune [--steps=3] [--methods=full,lora,prefix,loreft] [--config.field=value ...]

One device, synthetic batches, the real train step (`lm.train_step`: a PEFT method's base is the step's frozen
argument). Per method: trainable parameters, optimizer-state bytes (the abstract state, exact), and from XLA's
compiled memory analysis the arguments (parameters, optimizer state, batch), the temporaries (activations and
gradients) and the outputs; then the median time of `--steps` steps after a compile step. The model is a
Llama-shaped 45M-parameter network with a 32k vocabulary (`benchmark_config`), in fp32, at batch 8 x 128.
"""

from __future__ import annotations

from absl import flags
import flax.linen as nn
import jax
from ml_collections import config_flags

from lm import cli
from lm import config as lm_config
from lm import model as model_lib
from lm import peft
from lm import preflight
from lm import sharding as sharding_lib
from lm import train_step as train_step_lib
from lm.bench import synthetic_batch
from lm.bench.timing import median_seconds

METHODS = ("full", "lora", "prefix", "loreft")


def benchmark_config():
    """The model and batch every method is measured on."""
    c = lm_config.base_config()
    c.model.update(vocab_size=32000, d_model=512, num_layers=4, num_heads=8, num_kv_heads=8, mlp_dim=1408,
                   max_seq_len=128, dtype="float32", remat_policy="none")
    c.data.update(source="synthetic", seq_len=128, batch_size=8)
    c.loss.chunk_size = 4096
    return c


def method_config(config, method: str):
    """`config` fine-tuned with `method` (PEFT methods need a base to point to; the benchmark never reads it)."""
    config = config.copy_and_resolve_references()
    config.finetune.method = method
    if method != "full":
        config.init_from = "benchmark-base"
    return lm_config.validate(config)


def compiled_memory(config, method: str) -> dict:
    """Trainable parameters, optimizer-state bytes and the compiled step's memory analysis (`lm.preflight`) of
    `method` on one device; nothing is allocated (shapes only)."""
    config = method_config(config, method)
    state = train_step_lib.build(config, jax.devices()[:1]).abstract_state()
    compiled = preflight.compiled_memory(config, {"data": 1, "fsdp": 1, "tensor": 1})
    return {"method": method, "trainable": peft.count(state.params),
            "optimizer_bytes": sharding_lib.bytes_per_device(
                state.opt_state, jax.tree.map(lambda leaf: leaf.sharding, state.opt_state)),
            "argument_bytes": compiled.arguments, "temp_bytes": compiled.temporaries,
            "output_bytes": compiled.outputs}


def step_seconds(config, method: str, steps: int) -> float:
    """Median seconds of `method`'s train step (randomly initialised base and adapters)."""
    training = train_step_lib.build(method_config(config, method), jax.devices()[:1])
    state = training.init_state()
    frozen = {}
    if method != "full":
        base = peft.split(nn.unbox(model_lib.init(training.model, jax.random.key(1))))[0]
        frozen = jax.device_put(base, training.shardings.frozen)
    step = training.train_step()
    batch = synthetic_batch(config, training.shardings.batch)

    def run():
        nonlocal state
        state, metrics = step(state, batch, frozen)
        jax.block_until_ready(metrics)

    return median_seconds(run, warmup=1, repeats=steps)


def table(rows: list[dict]) -> str:
    full = next((r for r in rows if r["method"] == "full"), rows[0])
    mib = 2 ** 20
    lines = ["| method | trainable params | optimizer state MiB (% of full) | arguments MiB | temporaries MiB | "
             "step ms |", "|---|---|---|---|---|---|"]
    for r in rows:
        share = 100 * r["optimizer_bytes"] / full["optimizer_bytes"]
        lines.append(f"| {r['method']} | {r['trainable']:,} | {r['optimizer_bytes'] / mib:.2f} ({share:.2f}%) | "
                     f"{r['argument_bytes'] / mib:.1f} | {r['temp_bytes'] / mib:.1f} | "
                     f"{1000 * r['step_seconds']:.0f} |")
    return "\n".join(lines)


def main(argv):
    del argv
    config = flags.FLAGS.config
    rows = []
    for method in flags.FLAGS.methods:
        row = compiled_memory(config, method)
        row["step_seconds"] = step_seconds(config, method, flags.FLAGS.steps)
        rows.append(row)
        print(f"{method}: {row}", flush=True)
    m = config.model
    print(f"\nmodel d={m.d_model} L={m.num_layers} vocab={m.vocab_size} {m.dtype}, batch {config.data.batch_size} x "
          f"{config.data.seq_len}, {jax.devices()[0].device_kind}; LoRA rank {config.finetune.lora.rank} on "
          f"{', '.join(config.finetune.lora.targets)}, prefix length {config.finetune.prefix.length}, LoReFT rank "
          f"{config.finetune.loreft.rank}\n")
    print(table(rows))


if __name__ == "__main__":
    config_flags.DEFINE_config_dict("config", benchmark_config())
    flags.DEFINE_integer("steps", 3, "Timed steps per method (after one compile step).")
    flags.DEFINE_list("methods", list(METHODS), "Methods to measure.")
    cli.run(main)
