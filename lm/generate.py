"""Sampling from a trained model with a KV cache, alone or with a draft model (speculative decoding).

    python -m lm.generate --workdir=DIR --prompt=TEXT [--prompt=TEXT ...] [--max_new_tokens=64] [--temperature=0.8]
        [--top_k=40] [--top_p=0.95] [--min_p=0.05] [--repetition_penalty=1.2] [--frequency_penalty=0.5]
        [--presence_penalty=0.5] [--no_repeat_ngram_size=3] [--stop=TEXT ...] [--seed=0] [--step=N]
        [--draft_workdir=D --draft_tokens=4]

The model and its tokenizer are the run's own (`DIR/config.json`, `DIR/tokenizer.model`); nothing is trained here.
One jitted program per (batch, prompt length, settings): the prompts, left-padded to a common length, are run
through the model once (prefill) filling a `lm.kv_cache.KVCache` `[layers, batch, slots, kv_heads, head_dim]`; then
a `lax.while_loop` draws a token per row and runs just that token against the cache, until every row has produced a
stop (EOS, a stop id or a stop string) or `max_new_tokens` tokens. Each step computes logits for the last position
only (`Transformer.decode`), never `[batch, length, vocab]`.

How a token is drawn (`lm.sampling.Sampling`: temperature, top-k, top-p, min-p, repetition / frequency / presence
penalties, no-repeat n-grams) is applied on device inside the loop, from each row's tokens so far (`Context`); stop
strings are matched on device on the bytes of each reply (`lm.sampling.StopStrings`), however it was tokenised.
Draws use `jax.random.fold_in(key(seed), step)`, so the same seed gives the same text.

With `--draft_workdir` a smaller model with the same tokenizer proposes `--draft_tokens` tokens per round and the
model verifies them in one forward pass (`lm.speculative`); the output follows the model's own distribution exactly
(greedy: the same tokens).
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
from lm import kv_cache
from lm import model as model_lib
from lm import sharding as sharding_lib
from lm import speculative
from lm.data import tokenizer as tokenizer_lib
from lm.errors import ArgumentError
from lm.sampling import Sampling, Stops, StopStrings, sample, start_context

# Prompt lengths are padded up to a multiple of this, so prompts of similar length share one compiled program.
PROMPT_LENGTH_MULTIPLE = 16


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "sampling", "stop_ids", "pad_id"))
def _generate(params, prompt_bt, start_b, rng, stop_strings, *, model: model_lib.Transformer, max_new_tokens: int,
              sampling: Sampling, stop_ids: tuple[int, ...], pad_id: int):
    """Prefill plus the decode loop: `(reply_bt, lengths_b)`, each row's reply and how many of its tokens count
    (through its first stop)."""
    batch, prompt_length = prompt_bt.shape
    cache = kv_cache.KVCache.zeros(model.cfg, start_b, prompt_length + max_new_tokens, prompt_length)
    logits_bv, cache = model.apply({"params": params}, prompt_bt, cache, method=model.decode)

    def keep_going(carry):
        step, _, _, _, _, done_b, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done_b)

    def decode_one(carry):
        step, logits_bv, cache, context, stops, done_b, lengths_b = carry
        token_b = jnp.where(done_b, pad_id, sample(logits_bv, jax.random.fold_in(rng, step), sampling, context))
        context = context.append(token_b)
        stops, stopped_b = stops.push(token_b, ~done_b)
        lengths_b = lengths_b + ~done_b
        logits_bv, cache = model.apply({"params": params}, token_b[:, None], cache, method=model.decode)
        return step + 1, logits_bv, cache, context, stops, done_b | stopped_b, lengths_b

    context = start_context(prompt_bt, start_b, max_new_tokens)
    carry = (jnp.zeros((), jnp.int32), logits_bv, cache, context, Stops.start(stop_ids, stop_strings, batch),
             jnp.zeros((batch,), bool), jnp.zeros((batch,), jnp.int32))
    _, _, _, context, _, _, lengths_b = jax.lax.while_loop(keep_going, decode_one, carry)
    return context.tokens_bs[:, prompt_length:], lengths_b


@dataclasses.dataclass(frozen=True)
class Draft:
    """A draft model for speculative decoding (`lm.speculative`): its run config and parameters (same tokenizer as
    the target's), the tokens it proposes per round, and the acceptance rate below which decoding goes on without
    it (measured over the first `speculative.PROBE_ROUNDS` rounds)."""

    config: ml_collections.ConfigDict
    params: object
    tokens: int = 4
    min_acceptance: float = speculative.MIN_ACCEPTANCE

    def __post_init__(self):
        if self.tokens < 1:
            raise ArgumentError(f"draft_tokens must be >= 1, got {self.tokens}")


def generate(config: ml_collections.ConfigDict, params, prompts: list[list[int]], *, max_new_tokens: int,
             sampling: Sampling = Sampling(), seed: int = 0, eos_id: int | None = None, pad_id: int = 0,
             mesh: jax.sharding.Mesh | None = None, stop_ids: Sequence[int] = (),
             stop_strings: StopStrings | None = None, prompt_length: int | None = None, draft: Draft | None = None,
             stats: dict | None = None) -> list[list[int]]:
    """Completes each prompt (a list of token ids, at least one) with up to `max_new_tokens` sampled tokens.

    Returns the new tokens of each prompt, ending with `eos_id`, a token of `stop_ids`, or the token that completed
    one of `stop_strings` when one was produced (nothing after it). `mesh` (default: the one `params` live on)
    shards the batch and the cache by the config's logical rules. `prompt_length`: the slots prompts are left-padded
    to (default: the longest prompt rounded up to `PROMPT_LENGTH_MULTIPLE`); callers that bucket their own shapes
    set it. `draft`: decode speculatively with this draft model; `stats`, if given, receives its counts (`rounds`,
    `proposed`, `accepted` drafted tokens).
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
    if draft is not None:
        speculative.check_pair(config, draft.config, longest + max_new_tokens)
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
    arguments = dict(max_new_tokens=max_new_tokens, sampling=sampling, stop_ids=stops, pad_id=pad_id)
    with shardings.activation_rules():
        placed_prompt_bt = sharding_lib.from_host(prompt_bt, shardings.batch)
        if draft is None:
            reply_bt, lengths_b = _generate(nn.unbox(params), placed_prompt_bt, start_b, jax.random.key(seed),
                                            stop_strings, model=model, **arguments)
        else:
            reply_bt, lengths_b, counts = speculative.generate(
                nn.unbox(params), nn.unbox(draft.params), placed_prompt_bt, start_b, jax.random.key(seed),
                stop_strings, model=model, draft=model_lib.build(draft.config), draft_tokens=draft.tokens,
                min_acceptance=draft.min_acceptance, **arguments)
            if stats is not None:
                stats.update({name: int(value) for name, value in jax.device_get(counts).items()})
    reply_bt, lengths_b = jax.device_get((reply_bt, lengths_b))
    return [row[:length] for row, length in zip(np.asarray(reply_bt)[:rows].tolist(), lengths_b[:rows].tolist())]


def generate_text(config: ml_collections.ConfigDict, params, tokenizer, prompts: list[str], *, max_new_tokens: int,
                  temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                  sampling: Sampling | None = None, stop: Sequence[str] = (), draft: Draft | None = None,
                  stats: dict | None = None) -> list[str]:
    """Text completions of text prompts (each prompt starts with BOS, as training documents do; EOS ends one, and
    so does any string of `stop`, which is cut from the text with everything after it). How tokens are drawn:
    `sampling` (every setting of `lm.sampling.Sampling`), or just `temperature`, `top_k` and `top_p`."""
    if sampling is None:
        sampling = Sampling(temperature, top_k, top_p)
    elif (temperature, top_k, top_p) != (0.0, 0, 1.0):
        raise ArgumentError("give either sampling= or temperature/top_k/top_p, not both")
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    prompt_ids = [bos + tokenizer.encode(p) for p in prompts]
    eos_id = tokenizer.eos_id
    strings = StopStrings.build(list(stop), tokenizer.token_byte_strings(config.model.vocab_size)) if stop else None
    new_ids = generate(config, params, prompt_ids, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                       eos_id=eos_id, pad_id=0 if tokenizer.pad_id is None else tokenizer.pad_id,
                       stop_strings=strings, draft=draft, stats=stats)
    return [cut_at_stop(tokenizer.decode([t for t in ids if t != eos_id]), stop) for ids in new_ids]


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the first occurrence of any string of `stop` (OpenAI's convention: the stop is not returned)."""
    ends = [text.find(s) for s in stop if s and s in text]
    return text[:min(ends)] if ends else text


def define_flags() -> None:
    """The CLI's flags; defined only when run as a program, so importing this module defines none."""
    flags.DEFINE_string("workdir", None, "Run directory holding config.json, tokenizer.model and checkpoints/.",
                        required=True)
    flags.DEFINE_multi_string("prompt", None, "A prompt; repeat the flag for a batch of prompts.", required=True)
    flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt (fewer if EOS comes first).")
    flags.DEFINE_float("temperature", 0.0, "0: greedy; otherwise logits are divided by it before sampling.")
    flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: off).")
    flags.DEFINE_float("top_p", 1.0, "Sample among the smallest set of tokens whose probability reaches p (1: off).")
    flags.DEFINE_float("min_p", 0.0, "Sample among tokens at least min_p times as likely as the likeliest (0: off).")
    flags.DEFINE_float("repetition_penalty", 1.0, "CTRL's penalty on tokens already in the text (1: off).")
    flags.DEFINE_float("frequency_penalty", 0.0, "Subtracted from a logit per earlier use in the reply (0: off).")
    flags.DEFINE_float("presence_penalty", 0.0, "Subtracted from the logit of any token used in the reply (0: off).")
    flags.DEFINE_integer("no_repeat_ngram_size", 0, "Never repeat an n-gram of this size (0: off).")
    flags.DEFINE_multi_string("stop", [], "A string that ends a reply (not printed); repeat for several.")
    flags.DEFINE_integer("seed", 0, "Random seed of the sampler.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_string("draft_workdir", None, "Speculative decoding: a run with the same tokenizer that drafts.")
    flags.DEFINE_integer("draft_tokens", 4, "Speculative decoding: tokens the draft proposes per round.")


def sampling_from_flags(values) -> Sampling:
    """The `Sampling` of the sampler flags (`define_flags`)."""
    return Sampling(**{field.name: getattr(values, field.name) for field in dataclasses.fields(Sampling)})


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    sampling = sampling_from_flags(FLAGS)
    restored = checkpoint.restore(FLAGS.workdir, FLAGS.step)
    tokenizer = tokenizer_lib.from_workdir(FLAGS.workdir)
    draft = None
    if FLAGS.draft_workdir:
        draft_run = checkpoint.restore(FLAGS.draft_workdir)
        speculative.check_tokenizers(tokenizer, tokenizer_lib.from_workdir(FLAGS.draft_workdir),
                                     FLAGS.workdir, FLAGS.draft_workdir)
        draft = Draft(draft_run.config, draft_run.params, FLAGS.draft_tokens)
    stats = {}
    completions = generate_text(
        restored.config, restored.params, tokenizer, FLAGS.prompt, max_new_tokens=FLAGS.max_new_tokens,
        sampling=sampling, seed=FLAGS.seed, stop=FLAGS.stop, draft=draft, stats=stats)
    if jax.process_index() == 0:
        for prompt, completion in zip(FLAGS.prompt, completions):
            print(f"=== {prompt!r} (step {restored.step})\n{prompt}{completion}\n", flush=True)
        if draft is not None and stats.get("proposed"):
            print(f"speculative decoding: {stats['accepted']} of {stats['proposed']} drafted tokens accepted "
                  f"({stats['accepted'] / stats['proposed']:.2f}) in {stats['rounds']} rounds", flush=True)


if __name__ == "__main__":
    from lm import cli

    define_flags()
    cli.run(main)
