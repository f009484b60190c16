"""Sampling from a trained model with a KV cache.

    python -m lm.generate --workdir=DIR --prompt=TEXT [--prompt=TEXT ...] [--max_new_tokens=64] [--temperature=0.8]
        [--top_k=40] [--top_p=0.95] [--seed=0] [--step=N]

The model and its tokenizer are the run's own (`DIR/config.json`, `DIR/tokenizer.model`); nothing is trained here.
One jitted program per (batch, prompt length, settings): the prompts, left-padded to a common length so every row
writes the same cache slot at each step, are run through the model once (prefill) filling a `lm.model.KVCache`
`[layers, batch, max_len, kv_heads, head_dim]`; then a `lax.while_loop` samples a token per row and runs just that
token against the cache, until every row has produced EOS or `max_new_tokens` tokens. Each step computes logits
for the last position only (`Transformer.decode`), never `[batch, length, vocab]`.

Sampling (`Sampling`): temperature 0 is greedy (argmax); otherwise logits are divided by the temperature, then
top-k keeps the k most likely tokens, then top-p (nucleus) keeps the smallest set of the remaining ones whose
probability reaches p; a token is drawn from what is left. Draws use `jax.random.fold_in(key(seed), step)`, so the
same seed gives the same text.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lm import checkpoint
from lm import model as model_lib
from lm import sharding as sharding_lib
from lm.data import tokenizer as tokenizer_lib
from lm.errors import ArgumentError

# Prompt lengths are padded up to a multiple of this, so prompts of similar length share one compiled program.
PROMPT_LENGTH_MULTIPLE = 16


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How a token is drawn from the logits. temperature 0: greedy; top_k 0: off; top_p 1: off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ArgumentError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ArgumentError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ArgumentError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")


def sample(logits_bv: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
    """int32 `[batch]` tokens drawn from fp32 `logits_bv` `[batch, vocab]` as `sampling` says."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits_bv = logits_bv.astype(jnp.float32) / sampling.temperature
    if sampling.top_k:
        kth_largest_b1 = jax.lax.top_k(logits_bv, sampling.top_k)[0][:, -1:]
        logits_bv = jnp.where(logits_bv < kth_largest_b1, -jnp.inf, logits_bv)
    if sampling.top_p < 1.0:
        sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
        probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
        # Keep a token while the mass of the more likely ones is still short of p: the smallest set reaching p.
        mass_before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
        kept_b = jnp.sum(mass_before_bv < sampling.top_p, axis=-1)
        threshold_b1 = jnp.take_along_axis(sorted_bv, kept_b[:, None] - 1, axis=-1)
        logits_bv = jnp.where(logits_bv < threshold_b1, -jnp.inf, logits_bv)
    return jax.random.categorical(rng, logits_bv, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "sampling", "stop_ids", "pad_id"))
def _generate(params, prompt_bt, start_b, rng, *, model: model_lib.Transformer, max_new_tokens: int,
              sampling: Sampling, stop_ids: tuple[int, ...], pad_id: int):
    """Prefill plus the decode loop: `(new_tokens_bt, steps)`, rows padded with `pad_id` after their first token
    of `stop_ids` (EOS and the like)."""
    batch, prompt_length = prompt_bt.shape
    cache = model_lib.KVCache.zeros(model.cfg, start_b, prompt_length + max_new_tokens, prompt_length)
    logits_bv, cache = model.apply({"params": params}, prompt_bt, cache, method=model.decode)

    def keep_going(carry):
        step, _, _, _, done_b = carry
        return (step < max_new_tokens) & ~jnp.all(done_b)

    def decode_one(carry):
        step, logits_bv, cache, new_tokens_bt, done_b = carry
        token_b = jnp.where(done_b, pad_id, sample(logits_bv, jax.random.fold_in(rng, step), sampling))
        new_tokens_bt = new_tokens_bt.at[:, step].set(token_b)
        done_b = done_b | jnp.isin(token_b, jnp.asarray(stop_ids, jnp.int32))
        logits_bv, cache = model.apply({"params": params}, token_b[:, None], cache, method=model.decode)
        return step + 1, logits_bv, cache, new_tokens_bt, done_b

    new_tokens_bt = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
    carry = (jnp.zeros((), jnp.int32), logits_bv, cache, new_tokens_bt, jnp.zeros((batch,), bool))
    steps, _, _, new_tokens_bt, _ = jax.lax.while_loop(keep_going, decode_one, carry)
    return new_tokens_bt, steps


def generate(config: ml_collections.ConfigDict, params, prompts: list[list[int]], *, max_new_tokens: int,
             sampling: Sampling = Sampling(), seed: int = 0, eos_id: int | None = None, pad_id: int = 0,
             mesh: jax.sharding.Mesh | None = None, stop_ids: Sequence[int] = (),
             prompt_length: int | None = None) -> list[list[int]]:
    """Completes each prompt (a list of token ids, at least one) with up to `max_new_tokens` sampled tokens.

    Returns the new tokens of each prompt, ending with `eos_id` or a token of `stop_ids` when one was produced
    (nothing after it). `mesh` (default: the one `params` live on) shards the batch and the cache by the config's
    logical rules. `prompt_length`: the slots prompts are left-padded to (default: the longest prompt rounded up to
    `PROMPT_LENGTH_MULTIPLE`); callers that bucket their own shapes set it.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ArgumentError("every prompt needs at least one token (e.g. BOS)")
    if max_new_tokens < 1:
        raise ArgumentError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    model = model_lib.build(config)
    longest = max(len(p) for p in prompts)
    if prompt_length is None:
        prompt_length = -(-longest // PROMPT_LENGTH_MULTIPLE) * PROMPT_LENGTH_MULTIPLE
    elif prompt_length < longest:
        raise ArgumentError(f"prompt_length={prompt_length} is shorter than the longest prompt ({longest} tokens)")
    if longest + max_new_tokens > config.model.max_seq_len:
        # Positions past max_seq_len were never trained (and a learned table has none); the cache would grow too.
        raise ArgumentError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                            f"config.model.max_seq_len={config.model.max_seq_len}")
    shardings = sharding_lib.model_shardings(config, mesh or sharding_lib.mesh_of(params, config), model=model)
    rows = len(prompts)
    # Rows are padded to a multiple of the pieces the batch sharding cuts them into (the padding rows are dropped).
    batch_shards = sharding_lib.row_shards(shardings.batch)
    batch = -(-rows // batch_shards) * batch_shards
    prompt_bt = np.full((batch, prompt_length), pad_id, np.int32)
    start_b = np.full((batch,), prompt_length - 1, np.int32)
    for b, prompt in enumerate(prompts):
        prompt_bt[b, prompt_length - len(prompt):] = prompt
        start_b[b] = prompt_length - len(prompt)
    prompt_bt[rows:, -1] = prompts[0][-1]
    stops = tuple(sorted(set(stop_ids) | ({eos_id} if eos_id is not None else set())))
    with shardings.activation_rules():
        new_tokens_bt, _ = _generate(
            nn.unbox(params), sharding_lib.from_host(prompt_bt, shardings.batch), start_b,
            jax.random.key(seed), model=model, max_new_tokens=max_new_tokens, sampling=sampling,
            stop_ids=stops, pad_id=pad_id)
    completions = []
    for row in np.asarray(jax.device_get(new_tokens_bt))[:rows].tolist():
        ends = [i for i, token in enumerate(row) if token in stops]
        completions.append(row[:ends[0] + 1] if ends else row)
    return completions


def generate_text(config: ml_collections.ConfigDict, params, tokenizer, prompts: list[str], *, max_new_tokens: int,
                  temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> list[str]:
    """Text completions of text prompts (each prompt starts with BOS, as training documents do; EOS ends one)."""
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    prompt_ids = [bos + tokenizer.encode(p) for p in prompts]
    eos_id = tokenizer.eos_id
    new_ids = generate(config, params, prompt_ids, max_new_tokens=max_new_tokens,
                       sampling=Sampling(temperature, top_k, top_p), seed=seed, eos_id=eos_id,
                       pad_id=0 if tokenizer.pad_id is None else tokenizer.pad_id)
    return [tokenizer.decode([t for t in ids if t != eos_id]) for ids in new_ids]


def define_flags() -> None:
    """The CLI's flags; defined only when run as a program, so importing this module defines none."""
    flags.DEFINE_string("workdir", None, "Run directory holding config.json, tokenizer.model and checkpoints/.",
                        required=True)
    flags.DEFINE_multi_string("prompt", None, "A prompt; repeat the flag for a batch of prompts.", required=True)
    flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt (fewer if EOS comes first).")
    flags.DEFINE_float("temperature", 0.0, "0: greedy; otherwise logits are divided by it before sampling.")
    flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: off).")
    flags.DEFINE_float("top_p", 1.0, "Sample among the smallest set of tokens whose probability reaches p (1: off).")
    flags.DEFINE_integer("seed", 0, "Random seed of the sampler.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    sampling = Sampling(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
    restored = checkpoint.restore(FLAGS.workdir, FLAGS.step)
    tokenizer = tokenizer_lib.from_workdir(FLAGS.workdir)
    completions = generate_text(
        restored.config, restored.params, tokenizer, FLAGS.prompt, max_new_tokens=FLAGS.max_new_tokens,
        temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p, seed=FLAGS.seed)
    if jax.process_index() == 0:
        for prompt, completion in zip(FLAGS.prompt, completions):
            print(f"=== {prompt!r} (step {restored.step})\n{prompt}{completion}\n", flush=True)


if __name__ == "__main__":
    from lm import cli

    define_flags()
    cli.run(main)
