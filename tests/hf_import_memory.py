"""Host memory and time of importing a synthetic Llama-shaped Hugging Face checkpoint.

    python tests/hf_import_memory.py DIR [--make] [--layers=4 --d_model=1024 --vocab=32000 --dtype=float32]

`--make` first writes the checkpoint (random weights, `config.json` and `model.safetensors`) into DIR. Then it
loads the weights onto one device with `lm.hf.convert.load_params` and prints one JSON line: the model's bytes, the
largest tensor's, the process's resident memory before the import and at its peak (the kernel's high-water mark),
and `extra_bytes` = peak - before - model (every device's copy counted): what the import held beyond the model it
built.
"""

import argparse
import json
import math
import os
import resource
import sys
import time


def resident_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def make_checkpoint(directory: str, layers: int, d_model: int, vocab: int, dtype: str) -> None:
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    mlp = 4 * d_model
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
              "hidden_size": d_model, "intermediate_size": mlp, "num_hidden_layers": layers,
              "num_attention_heads": d_model // 64, "num_key_value_heads": d_model // 64,
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "dtype": dtype}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (vocab, d_model), "lm_head.weight": (vocab, d_model),
              "model.norm.weight": (d_model,)}
    for i in range(layers):
        layer = f"model.layers.{i}."
        shapes.update({layer + "input_layernorm.weight": (d_model,),
                       layer + "post_attention_layernorm.weight": (d_model,),
                       **{f"{layer}self_attn.{p}_proj.weight": (d_model, d_model) for p in "qkvo"},
                       layer + "mlp.gate_proj.weight": (mlp, d_model), layer + "mlp.up_proj.weight": (mlp, d_model),
                       layer + "mlp.down_proj.weight": (d_model, mlp)})
    numpy_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    tensors = {name: (rng.standard_normal(shape, np.float32) * 0.02).astype(numpy_dtype)
               for name, shape in shapes.items()}
    if dtype == "bfloat16":  # safetensors' numpy writer knows no bfloat16: write through the flax one.
        import jax.numpy as jnp
        from safetensors.flax import save_file as save_jax

        save_jax({name: jnp.asarray(t) for name, t in tensors.items()}, os.path.join(directory, "model.safetensors"),
                 metadata={"format": "pt"})
    else:
        save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("--make", action="store_true")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d_model", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--zero3", action="store_true", help="ZeRO stage 3: parameters split over every device.")
    args = parser.parse_args()
    if args.make:
        make_checkpoint(args.directory, args.layers, args.d_model, args.vocab, args.dtype)

    import jax

    from lm.hf import convert, weights

    config = convert.config_for(args.directory, {"sharding.zero_stage": 3 if args.zero3 else 1})
    reader = weights.SafetensorsReader(args.directory)
    largest = max(math.prod(reader.shape(name)) * reader.dtype(name).itemsize for name in reader.names())
    before = resident_bytes()
    started = time.perf_counter()
    params, _ = convert.load_params(args.directory, config)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model = sum(shard.data.nbytes for leaf in jax.tree.leaves(params) for shard in leaf.addressable_shards)
    print(json.dumps({"model_bytes": model, "largest_tensor_bytes": largest, "resident_before": before,
                      "peak_resident": peak, "extra_bytes": peak - before - model,
                      "extra_over_largest": round((peak - before - model) / largest, 3), "seconds": round(seconds, 2),
                      "devices": len(jax.devices()), "zero_stage": config.sharding.zero_stage}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
