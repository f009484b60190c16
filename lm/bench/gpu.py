"""The prepared accelerator check: every figure the project needs from a GPU, in one command of a few minutes.

    bash launch/gpu_check.sh [--out=DIR]      # one NVIDIA GPU, at most 8 minutes
    bash launch/gpu_check.sh --smoke          # tiny shapes, any backend (CI runs it on the CPU)

It writes `DIR/gpu_check.json` (every figure, the command, jax/jaxlib versions, XLA flags, the device) and
`DIR/gpu_check.md` (the same as tables, each figure beside its target), and prints the tables. Sections:

- **train**: tokens/s, MFU (lm.flops model FLOPs over the device's datasheet bf16 peak) and memory of the real
  train step (`lm.train_step`, one device, synthetic batches) for `configs/gpt2_124m.py` at T=1024 and a
  Llama-1B shape (`configs/llama_1b.py`) at T=2048, bf16 with the config's attention (cuDNN on a GPU). Memory: the
  device's peak bytes in use (`memory_stats`, where the backend keeps them) and XLA's compiled figure.
- **loss**: the blockwise loss against the naive one (`lm.bench.loss`) at N=8192 D=2304 V=256000 bf16:
  time ratio, and peak memory (XLA's temporaries plus outputs) over the outputs (the gradients) alone.
- **attention**: `value_and_grad` of attention over packed documents (random lengths, mean 512) at T=4096 and 8192
  with each implementation the backend has (`xla`; on a GPU `cudnn` with the documents as a mask and `cudnn packed`,
  the documents as run lengths and offsets, `config.model.attention_max_segments`): time and compiled temporary
  memory.
- **decode**: greedy decoding of the Llama-1B shape (bf16 weights) at batch 1 and 32: tokens/s over the decode
  steps alone (a run of 2N new tokens less a run of N; at the smoke's tiny shapes the difference is within the
  host's noise and may even come out negative), and the fraction of the datasheet memory bandwidth that
  reading the weights and the KV cache once per step reaches.

Each section runs in a try block: a failure is recorded in the JSON and the table and the next section runs.
Only what the device image has is needed (no TensorFlow: the data is synthetic).
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
import traceback

from absl import app, flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm import attention as attention_lib
from lm import config as lm_config
from lm import flops
from lm import generate as generate_lib
from lm import model as model_lib
from lm import sharding as sharding_lib
from lm import train_step as train_step_lib
from lm.bench import loss as loss_bench
from lm.bench import synthetic_batch
from lm.bench.timing import median_seconds

_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny shapes: checks the script's logic on any backend in seconds.")
_OUT = flags.DEFINE_string("out", "gpu_check", "Directory for gpu_check.json and gpu_check.md.")
_SECTIONS = flags.DEFINE_list("sections", ["train", "loss", "attention", "decode"], "Sections to run.")

# The acceptance targets of the first GPU run (H100/H200 class), shown beside the figures.
TARGETS = {
    "gpt2_124m tokens/s": 400_000,
    "llama_1b MFU": 0.45,
    "loss time ratio": 0.9,
    "loss peak / outputs": 1.1,
    "cudnn packed / xla attention memory at T=8192": 0.10,
}


def _load_config(name: str):
    """`configs/<name>.py`'s config (read from the tree, so the check runs without installing lm)."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def train_configs(smoke: bool) -> dict:
    """name -> config of the train section: GPT-2 small at T=1024 and the Llama-1B shape at T=2048, bf16."""
    gpt2, llama = _load_config("gpt2_124m"), _load_config("llama_1b")
    gpt2.data.seq_len, gpt2.data.batch_size = 1024, 32
    llama.data.seq_len, llama.data.batch_size = 2048, 8
    for config in (gpt2, llama):
        config.model.dtype = "bfloat16"
        config.mesh.fsdp = 1
        if smoke:
            m = config.model
            m.num_layers, m.d_model, m.num_heads, m.mlp_dim, m.vocab_size = 2, 64, 4, 128, 512
            m.num_kv_heads = 4 if m.num_kv_heads == m.num_heads else 2
            config.data.seq_len, config.data.batch_size, config.loss.chunk_size = 64, 2, 256
    return {"gpt2_124m": gpt2, "llama_1b": llama}


def _peak_bytes_in_use(device) -> int | None:
    stats = device.memory_stats()  # None on backends that keep no statistics (the CPU).
    return None if not stats else stats.get("peak_bytes_in_use")


def train_row(name: str, config, steps: int) -> dict:
    device = jax.devices()[0]
    training = train_step_lib.build(config, [device])
    state = training.init_state()
    batch = synthetic_batch(config, training.shardings.batch)
    compiled = training.train_step().lower(state, batch, {}).compile()
    analysis = compiled.memory_analysis()

    def step():
        nonlocal state
        state, metrics = compiled(state, batch, {})
        jax.block_until_ready(metrics)

    seconds = median_seconds(step, warmup=2, repeats=steps)
    tokens_per_second = config.data.batch_size * config.data.seq_len / seconds
    peak, peak_label = flops.peak_flops([device], config.model.dtype)
    return {
        "model": name, "parameters": flops.param_count(config), "batch": config.data.batch_size,
        "seq_len": config.data.seq_len, "dtype": config.model.dtype, "remat": config.model.remat_policy,
        "attention": attention_lib.resolve_implementation(config.model.attention, config.model.dtype),
        "step_seconds": seconds, "tokens_per_second": tokens_per_second,
        "mfu": flops.mfu(flops.train_flops_per_token(config, config.data.seq_len), tokens_per_second, peak),
        "peak_flops": peak, "peak_flops_source": peak_label,
        "peak_bytes_in_use": _peak_bytes_in_use(device),
        "compiled_bytes": (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                           - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes),
    }


def loss_row(smoke: bool) -> dict:
    case = loss_bench.CASES["big_bf16"]
    if smoke:
        case = loss_bench.Case(256, 64, 1000, "bfloat16", 256, time_on_cpu=True)
    row = loss_bench.run_case("big_bf16", case, repeats=5, time_all=True)
    output_bytes = (case.tokens * case.d_model + case.d_model * case.vocab) * jnp.dtype(case.dtype).itemsize
    row.update(output_mb=output_bytes / 1e6,
               naive_peak_over_outputs=(row["naive_mb"] * 1e6 + output_bytes) / output_bytes,
               chunked_peak_over_outputs=(row["chunked_mb"] * 1e6 + output_bytes) / output_bytes)
    return row


def packed_segment_ids(length: int, mean_document: int, rng: np.random.Generator) -> np.ndarray:
    """int32 `[1, length]`: documents of random lengths (exponential, mean `mean_document`) packed in one row."""
    segment_ids, position, segment = np.zeros(length, np.int32), 0, 1
    while position < length:
        size = max(1, int(rng.exponential(mean_document)))
        segment_ids[position:position + size] = segment
        position, segment = position + size, segment + 1
    return segment_ids[None]


def attention_rows(smoke: bool) -> list[dict]:
    heads, head_dim = (4, 16) if smoke else (16, 128)
    lengths, mean_document = ((128, 256), 32) if smoke else ((4096, 8192), 512)
    implementations = ["xla"] + (["cudnn", "cudnn packed"] if jax.default_backend() == "gpu" else [])
    rows = []
    for length in lengths:
        keys = jax.random.split(jax.random.key(0), 3)
        q, k, v = (jax.random.normal(key, (1, length, heads, head_dim), jnp.bfloat16) for key in keys)
        segment_ids = jnp.asarray(packed_segment_ids(length, mean_document, np.random.default_rng(length)))
        runs = attention_lib.count_segment_runs(np.asarray(segment_ids))
        for implementation in implementations:
            def loss(q, k, v, implementation=implementation):
                out = attention_lib.dot_product_attention(
                    q, k, v, segment_ids_bt=segment_ids, causal=True, implementation=implementation.split()[0],
                    max_segments=runs if implementation == "cudnn packed" else 0)
                return jnp.sum(out.astype(jnp.float32))

            row = {"seq_len": length, "heads": heads, "head_dim": head_dim, "implementation": implementation,
                   "documents": int(segment_ids.max())}
            try:
                compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
                row["temp_bytes"] = compiled.memory_analysis().temp_size_in_bytes
                row["seconds"] = median_seconds(lambda: jax.block_until_ready(compiled(q, k, v)), 1, 5)
            except Exception as error:  # An implementation this backend or shape does not support.
                row["error"] = f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"
            rows.append(row)
    return rows


def decode_rows(smoke: bool) -> list[dict]:
    config = train_configs(smoke)["llama_1b"]
    config.model.param_dtype = "bfloat16"
    prompt_length, new_tokens = (8, 64) if smoke else (128, 128)
    device = jax.devices()[0]
    model = model_lib.build(config)
    mesh = sharding_lib.default_mesh(config, [device])
    params = jax.device_put(nn.unbox(model_lib.init(model, jax.random.key(0))),
                            jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    m = config.model
    bandwidth = flops.device_memory_bandwidth(device.device_kind)
    rows = []
    for batch in (1, 4) if smoke else (1, 32):
        prompts = np.random.default_rng(batch).integers(0, m.vocab_size, (batch, prompt_length)).tolist()

        def run(count):
            return lambda: generate_lib.generate(config, params, prompts, max_new_tokens=count)

        # Decode steps alone: a run of 2N new tokens less one of N (the same prompt pass and per-call host work).
        step_seconds = (median_seconds(run(2 * new_tokens), 1, 3) - median_seconds(run(new_tokens), 1, 3)) / new_tokens
        # Per step every row reads the weights once and its KV cache (at prompt + 1.5 N slots on average).
        cache_bytes = (2 * m.num_layers * batch * (prompt_length + 1.5 * new_tokens) * m.num_kv_heads
                       * lm_config.head_dim(m) * jnp.dtype(m.dtype).itemsize)
        rows.append({"batch": batch, "prompt": prompt_length, "new_tokens": new_tokens,
                     "tokens_per_second": batch / step_seconds, "step_seconds": step_seconds,
                     "bytes_per_step": param_bytes + cache_bytes,
                     "bandwidth_fraction": None if bandwidth is None else
                     (param_bytes + cache_bytes) / step_seconds / bandwidth})
    return rows


def environment() -> dict:
    import jaxlib

    device = jax.devices()[0]
    return {"command": " ".join([os.path.basename(sys.executable), "-m", "lm.bench.gpu", *sys.argv[1:]]),
            "jax": jax.__version__, "jaxlib": jaxlib.__version__, "python": platform.python_version(),
            "backend": jax.default_backend(), "device": device.device_kind, "devices": jax.device_count(),
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""), "smoke": _SMOKE.value,
            "time": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _number(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [f"`{env['command']}` on {env['devices']} x {env['device']} ({env['backend']}), jax {env['jax']}, "
             f"jaxlib {env['jaxlib']}, XLA_FLAGS='{env['XLA_FLAGS']}', {env['time']}"
             + (" -- SMOKE (tiny shapes)" if env["smoke"] else ""), ""]
    for section, content in results["sections"].items():
        if "error" in content:
            lines += [f"**{section}** failed: {content['error']}", ""]
            continue
        rows = content["rows"]
        if section == "train":
            lines += ["| model | params | batch x T | attention | tokens/s | MFU | peak memory GB | compiled GB |",
                      "|---|---|---|---|---|---|---|---|"]
            lines += [f"| {r['model']} | {r['parameters'] / 1e6:.0f}M | {r['batch']} x {r['seq_len']} | "
                      f"{r['attention']} | {r['tokens_per_second']:,.0f} | {100 * r['mfu']:.1f}% | "
                      f"{_number(r['peak_bytes_in_use'] and r['peak_bytes_in_use'] / 1e9, '.2f')} | "
                      f"{r['compiled_bytes'] / 1e9:.2f} |" for r in rows]
            lines.append(f"targets: gpt2_124m >= {TARGETS['gpt2_124m tokens/s']:,} tokens/s; llama_1b >= "
                         f"{TARGETS['llama_1b MFU']:.0%} MFU")
        elif section == "loss":
            r = rows[0]
            lines += ["| shape | naive s | blockwise s | time ratio | naive peak / outputs "
                      "| blockwise peak / outputs |",
                      "|---|---|---|---|---|---|",
                      f"| {r['shape']} {r['dtype']} | {r['naive_seconds']:.4f} | {r['chunked_seconds']:.4f} | "
                      f"{r['ratio']:.2f} | {r['naive_peak_over_outputs']:.2f} | {r['chunked_peak_over_outputs']:.2f} |",
                      f"targets: time ratio <= {TARGETS['loss time ratio']}, blockwise peak / outputs <= "
                      f"{TARGETS['loss peak / outputs']}"]
        elif section == "attention":
            lines += ["| T | documents | implementation | seconds | temp MB |", "|---|---|---|---|---|"]
            lines += [f"| {r['seq_len']} | {r['documents']} | {r['implementation']} | "
                      f"{_number(r.get('seconds'), '.4f')} | "
                      f"{_number(r.get('temp_bytes') and r['temp_bytes'] / 1e6, ',.0f')} |"
                      + (f" {r['error']}" if "error" in r else "") for r in rows]
            lines.append(f"target: cudnn packed temp memory <= "
                         f"{TARGETS['cudnn packed / xla attention memory at T=8192']:.0%} of "
                         f"xla at the longest T")
        elif section == "decode":
            lines += ["| batch | prompt + new | tokens/s | ms/step | MB read/step | bandwidth fraction |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {r['batch']} | {r['prompt']} + {r['new_tokens']}..{2 * r['new_tokens']} | "
                      f"{r['tokens_per_second']:,.0f} | "
                      f"{1e3 * r['step_seconds']:.2f} | {r['bytes_per_step'] / 1e6:,.0f} | "
                      f"{_number(r['bandwidth_fraction'], '.1%')} |" for r in rows]
        lines.append("")
    return "\n".join(lines)


def main(argv) -> None:
    del argv
    smoke = _SMOKE.value
    runners = {
        "train": lambda: [train_row(name, config, steps=3 if smoke else 10)
                          for name, config in train_configs(smoke).items()],
        "loss": lambda: [loss_row(smoke)],
        "attention": lambda: attention_rows(smoke),
        "decode": lambda: decode_rows(smoke),
    }
    unknown = [s for s in _SECTIONS.value if s not in runners]
    if unknown:
        raise app.UsageError(f"--sections: unknown {unknown}; expected some of {', '.join(runners)}")
    results = {"environment": environment(), "targets": TARGETS, "sections": {}}
    os.makedirs(_OUT.value, exist_ok=True)
    for section in _SECTIONS.value:
        start = time.perf_counter()
        try:
            results["sections"][section] = {"rows": runners[section]()}
        except Exception as error:  # Record it and go on: the other sections' figures are worth the run.
            traceback.print_exc()
            results["sections"][section] = {"error": f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"}
        results["sections"][section]["seconds"] = time.perf_counter() - start
        print(f"{section}: {results['sections'][section]['seconds']:.0f} s", flush=True)
        with open(os.path.join(_OUT.value, "gpu_check.json"), "w") as f:  # After each section: a timeout keeps them.
            json.dump(results, f, indent=2)
        with open(os.path.join(_OUT.value, "gpu_check.md"), "w") as f:
            f.write(markdown(results))
    print(markdown(results))
    if any("error" in content for content in results["sections"].values()):
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
