"""Decoding speed: the KV cache (`lm.generate`) against recomputing the whole prefix for every new token, against
transformers' `generate`, and with speculative decoding.

    python -m lm.bench.decode [--config=configs/tiny.py] [--new_tokens=256] [--prompt_length=16]
        [--draft_layers=1 --draft_tokens=4] [--workdir=TARGET --draft_workdir=DRAFT --prompts=8] [--transformers=true]

For batch sizes 1 and 8, greedy-decodes `--new_tokens` tokens after a random prompt with randomly initialised
parameters (speed does not depend on the weights) in two ways:
- `kv_cache`: `lm.generate.generate`, one jitted prefill + `lax.while_loop` over single-token steps;
- `recompute`: the way nanoGPT samples: each step runs the full forward pass over the sequence so far and keeps the
  last position's logits (jitted per length bucket of 32 tokens so it compiles a handful of times, not 256).
Each is run once to compile, then timed `--repeats` times, the fastest kept; tokens/s counts new tokens of all rows.
The ratio is taken in this run.

First it prints the KV cache's bytes per token (per layer and for the whole model) of the config's model as MHA,
as GQA with a quarter of the key/value heads, and as MLA (`config.model.mla`'s ranks) at the same `d_model`, read
from the `lm.model.KVCache` each would allocate, with each one's KV-cache decoding speed at the largest batch (MLA
both absorbed and expanded, `config.model.mla.absorb`).

Speculative decoding (batch 1, greedy, `lm.speculative`): the model decoded alone, then with two drafts. The close
draft is the model's own first `--draft_layers` layers with its embeddings, final norm and head (self-speculative
"early exit" drafting; at random initialisation the residual stream is mostly the embedding, so it agrees with the
whole model often); the useless draft is a model of the same shape with other random weights (it agrees about once
in a vocabulary). For each: the acceptance rate, tokens/s, the speed-up over plain decoding, and whether the tokens
are plain decoding's. With `--workdir=TARGET --draft_workdir=DRAFT` (two trained runs sharing a tokenizer; a draft
trained on the target's own continuations, `lm.bench.draft_data`, agrees with it most), the close draft is DRAFT, and
each way decodes `--prompts` openings of `--prompt_length` tokens of the built-in corpus's validation files (which
neither run trained on), one at a time; the acceptance rate is over all of them.

Against transformers (batch 1, greedy, `--transformers`): the same weights written as a Hugging Face model
(`lm.hf`), loaded by `transformers.AutoModelForCausalLM` in PyTorch on the same CPU threads, `generate` with its KV
cache (`min_new_tokens` so both produce every token), timed after a warm-up run like lm's.
"""

import collections
import json
import time

from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from ml_collections import config_flags

from lm import cli
from lm import generate
from lm import kv_cache
from lm import model as model_lib
from lm import sharding as sharding_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 256, "Tokens generated per row.")
_PROMPT_LENGTH = flags.DEFINE_integer("prompt_length", 16, "Prompt tokens per row.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes to measure.")
_DRAFT_LAYERS = flags.DEFINE_integer("draft_layers", 1, "Speculative decoding: the close draft's layers.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Speculative decoding of this trained run (else random weights).")
_DRAFT_WORKDIR = flags.DEFINE_string("draft_workdir", None, "With --workdir: the trained run that drafts.")
_DRAFT_TOKENS = flags.DEFINE_integer("draft_tokens", 4, "Speculative decoding: tokens drafted per round.")
_PROMPTS = flags.DEFINE_integer("prompts", 8, "With --workdir: corpus openings decoded speculatively, one at a time.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs of each way (after one that compiles); the fastest counts.")
_TRANSFORMERS = flags.DEFINE_bool("transformers", True, "Time transformers' generate on the same weights.")

_BUCKET = 32


def recompute_decode(model, params, prompt_bt: np.ndarray, new_tokens: int) -> np.ndarray:
    """Greedy decoding without a cache: every step is a full forward pass over all tokens so far."""

    @jax.jit
    def next_token(params, tokens_bt, last):
        hidden_btd = model.apply({"params": params}, tokens_bt)
        logits_bv = model.apply({"params": params}, hidden_btd[:, last], method=model.logits)
        return jnp.argmax(logits_bv, axis=-1)

    batch, length = prompt_bt.shape
    buffer_bt = np.zeros((batch, length + new_tokens), np.int32)
    buffer_bt[:, :length] = prompt_bt
    for t in range(length, length + new_tokens):
        # Causal attention: the zeros after position t-1 do not change its logits.
        width = min(-(-t // _BUCKET) * _BUCKET, buffer_bt.shape[1])
        buffer_bt[:, t] = np.asarray(next_token(params, buffer_bt[:, :width], t - 1))
    return buffer_bt[:, length:]


def kv_cache_decode(config, params, prompt_bt: np.ndarray, new_tokens: int) -> np.ndarray:
    return np.asarray(generate.generate(config, params, prompt_bt.tolist(), max_new_tokens=new_tokens))


def attention_variants(config) -> dict[str, object]:
    """The config's model as MHA, GQA (a quarter of the heads for keys and values) and MLA (absorbed and expanded
    decoding), same `d_model`."""
    variants = {}
    for name, overrides in (("MHA", dict(num_kv_heads=config.model.num_heads)),
                            ("GQA", dict(num_kv_heads=max(1, config.model.num_heads // 4))),
                            ("MLA", dict(attention_type="mla", mla=dict(absorb=True))),
                            ("MLA exp.", dict(attention_type="mla", mla=dict(absorb=False)))):
        variant = ml_collections.ConfigDict(config.to_dict())
        variant.model.update(overrides)
        variants[name] = variant
    return variants


def cache_bytes_per_token(config) -> tuple[int, int]:
    """Bytes the KV cache of `config`'s model allocates per token: `(per layer, whole model)`, measured on the
    arrays `KVCache.zeros` makes (shapes only, nothing allocated)."""
    cfg = model_lib.model_config(config)
    slots = 128
    cache = jax.eval_shape(lambda: kv_cache.KVCache.zeros(cfg, jnp.zeros((1,), jnp.int32), slots))
    arrays = [a for a in (cache.key_lbsgh, cache.value_lbsgh) if a is not None]
    total = sum(a.size * a.dtype.itemsize for a in arrays) // slots
    return total // cfg.num_layers, total


def timed(fn):
    """`(seconds, result)` of `fn`: the fastest of `--repeats` runs after one that compiles (every program the timed
    runs use). A shared machine's noise only ever slows a run down, so the fastest is the closest to the cost."""
    fn()
    times = []
    for _ in range(_REPEATS.value):
        start = time.perf_counter()
        tokens = fn()
        times.append(time.perf_counter() - start)
    return min(times), tokens


def early_exit_draft(config, params, layers: int):
    """The model's first `layers` layers with its embeddings, final norm and head, as a model of its own."""
    if "layers" not in params or config.model.num_layers <= layers:
        raise ValueError(f"--draft_layers={layers} needs a scanned model of more layers")
    draft = ml_collections.ConfigDict(config.to_dict())
    draft.model.num_layers = layers
    return draft, {**params, "layers": jax.tree.map(lambda x: x[:layers], params["layers"])}


def speculative_decoding(config, params, prompt_1t: np.ndarray, new_tokens: int) -> None:
    """Prints plain against speculative decoding with a close and a useless draft (module docstring); with
    `--workdir` and `--draft_workdir`, of those trained runs, over `--prompts` openings of the built-in corpus's
    validation files, each decoded alone (batch 1) in turn."""
    if _WORKDIR.value:
        from lm import checkpoint
        from lm.bench import draft_data
        from lm.data import tokenizer as tokenizer_lib

        target, draft_run = checkpoint.restore(_WORKDIR.value), checkpoint.restore(_DRAFT_WORKDIR.value)
        config, params = target.config, target.params
        draft_config, draft_params = draft_run.config, draft_run.params
        tokenizer = tokenizer_lib.from_workdir(_WORKDIR.value)
        prompts = draft_data.corpus_prompts(tokenizer, _PROMPTS.value, _PROMPT_LENGTH.value, split="validation")
        close = f"{_DRAFT_WORKDIR.value} ({draft_config.model.num_layers} layers)"
        for c in (config, draft_config):  # As for the random model (main): RoPE needs no table.
            c.model.max_seq_len = max(c.model.max_seq_len, _PROMPT_LENGTH.value + new_tokens)
    else:
        draft_config, draft_params = early_exit_draft(config, params, _DRAFT_LAYERS.value)
        close = f"close ({_DRAFT_LAYERS.value} of {config.model.num_layers} layers)"
        prompts = prompt_1t.tolist()

    def each_alone(**options):
        """Every prompt decoded at batch 1 in turn: the replies, and the draft's counts summed over them."""
        replies, counts = [], collections.Counter()
        for prompt in prompts:
            stats = {}
            replies += generate.generate(config, params, [prompt], max_new_tokens=new_tokens, stats=stats,
                                         **options)
            counts.update(stats)
        return replies, counts

    tokens = new_tokens * len(prompts)
    plain_seconds, (plain, _) = timed(each_alone)
    useless_params = nn.unbox(model_lib.init(model_lib.build(draft_config), jax.random.key(1)))
    print(f"speculative decoding, batch 1, {len(prompts)} prompt(s) of {len(prompts[0])} tokens, {new_tokens} new "
          f"tokens each, K = {_DRAFT_TOKENS.value}: plain {tokens / plain_seconds:,.0f} tok/s")
    print(f"{'draft':>28}  {'accepted':>8}  {'tok/s':>7}  {'speed-up':>8}  same tokens")
    for name, draft_params_ in ((close, draft_params), ("useless (random)", useless_params)):
        draft = generate.Draft(draft_config, draft_params_, _DRAFT_TOKENS.value)
        seconds, (replies, counts) = timed(lambda: each_alone(draft=draft))
        accepted = counts["accepted"] / max(counts["proposed"], 1)
        print(f"{name:>28}  {accepted:>8.2f}  {tokens / seconds:>7,.0f}  {plain_seconds / seconds:>7.2f}x  "
              f"{'yes' if replies == plain else 'no'}")


def against_transformers(config, params, prompt_1t: np.ndarray, new_tokens: int) -> None:
    """Prints lm's batch-1 greedy decoding against transformers' `generate` on the same weights."""
    import os
    import tempfile

    import torch
    import transformers

    from lm.hf import architectures, weights

    with tempfile.TemporaryDirectory() as directory:
        weights.save_params(params, config, directory, max_shard_bytes=2**40)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(architectures.hf_config_from(config), f)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    torch.set_num_threads(os.cpu_count())
    input_ids = torch.tensor(prompt_1t, dtype=torch.long)

    def hf_generate():
        with torch.no_grad():
            out = hf_model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                    max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=True,
                                    pad_token_id=0)
        return out[0, prompt_1t.shape[1]:].tolist()

    hf_seconds, hf_tokens = timed(hf_generate)
    lm_seconds, lm_tokens = timed(lambda: generate.generate(config, params, prompt_1t.tolist(),
                                                            max_new_tokens=new_tokens)[0])
    agree = np.mean(np.asarray(hf_tokens) == np.asarray(lm_tokens))
    print(f"batch 1 greedy, {new_tokens} new tokens: lm {new_tokens / lm_seconds:,.0f} tok/s, transformers "
          f"{transformers.__version__} (PyTorch {torch.__version__}, {torch.get_num_threads()} threads) "
          f"{new_tokens / hf_seconds:,.0f} tok/s: {hf_seconds / lm_seconds:.2f}x; same tokens {100 * agree:.0f}%")


def main(argv):
    del argv
    config = _CONFIG.value
    new_tokens, prompt_length = _NEW_TOKENS.value, _PROMPT_LENGTH.value
    # RoPE has no position table: allowing longer sequences than training changes nothing but this check.
    config.model.max_seq_len = max(config.model.max_seq_len, prompt_length + new_tokens)
    model = model_lib.build(config)
    mesh = sharding_lib.default_mesh(config, jax.devices()[:1])
    params = jax.device_put(nn.unbox(model_lib.init(model, jax.random.key(0))),
                            jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    print(f"{config.model.num_layers} layers, d_model {config.model.d_model}, vocab {config.model.vocab_size}, "
          f"{config.model.dtype}; prompt {prompt_length} tokens, {new_tokens} new tokens, greedy, "
          f"{jax.devices()[0].device_kind}")
    batch = max(int(b) for b in _BATCH_SIZES.value)
    prompt_bt = np.random.default_rng(1).integers(0, config.model.vocab_size, (batch, prompt_length), dtype=np.int32)
    print(f"{'attention':>9}  {'cache values/token/layer':>24}  {'bytes/token/layer':>17}  {'bytes/token':>11}  "
          f"kv_cache tok/s (batch {batch})")
    for name, variant in attention_variants(config).items():
        per_layer, whole = cache_bytes_per_token(variant)
        values = kv_cache.KVCache.values_per_token(model_lib.model_config(variant))
        variant_params = jax.device_put(nn.unbox(model_lib.init(model_lib.build(variant), jax.random.key(0))),
                                        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        seconds, _ = timed(lambda: kv_cache_decode(variant, variant_params, prompt_bt, new_tokens))
        print(f"{name:>9}  {values:>24,}  {per_layer:>17,}  {whole:>11,}  {batch * new_tokens / seconds:>14,.0f}")
    print(f"{'batch':>5}  {'kv_cache tok/s':>14}  {'recompute tok/s':>15}  {'speed-up':>8}  same tokens")
    rng = np.random.default_rng(0)
    for batch in (int(b) for b in _BATCH_SIZES.value):
        prompt_bt = rng.integers(0, config.model.vocab_size, (batch, prompt_length), dtype=np.int32)
        cached_seconds, cached = timed(lambda: kv_cache_decode(config, params, prompt_bt, new_tokens))
        recompute_seconds, recomputed = timed(lambda: recompute_decode(model, params, prompt_bt, new_tokens))
        # Greedy paths agree token for token unless two logits tie to rounding; report rather than assert.
        agree = float(np.mean(cached == recomputed))
        print(f"{batch:>5}  {batch * new_tokens / cached_seconds:>14,.0f}  {batch * new_tokens / recompute_seconds:>15,.0f}  "
              f"{recompute_seconds / cached_seconds:>7.1f}x  {100 * agree:.0f}%")
    prompt_1t = rng.integers(0, config.model.vocab_size, (1, prompt_length), dtype=np.int32)
    speculative_decoding(config, params, prompt_1t, new_tokens)
    if _TRANSFORMERS.value:
        against_transformers(config, params, prompt_1t, new_tokens)


if __name__ == "__main__":
    cli.run(main)
