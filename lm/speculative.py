"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a small draft model proposes K tokens, the target
model scores all of them in one forward pass, and modified rejection sampling keeps the output distributed exactly
as the target's own sampling (`lm.sampling.distribution`; greedy: the very same tokens).

One round, for each row whose newest token `x` the caches have not seen yet (row slots, `lm.kv_cache`):

    draft:   x → q_1, draws d_1 ~ q_1;  d_1 → q_2, d_2 ~ q_2;  ...  d_{K-1} → q_K, d_K ~ q_K   (K small steps)
    target:  [x, d_1, ..., d_K] → p_1, ..., p_{K+1}                                         (one forward pass)
    accept:  d_i while u_i < p_i(d_i) / q_i(d_i) (u_i uniform); at the first rejection draw the replacement from
             norm(max(p_i - q_i, 0)); if all K are accepted, draw a bonus token from p_{K+1}.

Each round emits the n accepted drafts and one more token, so 1 to K + 1 tokens per target pass. Both caches roll back
by resetting each row's write position (`Slots.index_b`): whatever the rejected tokens wrote is overwritten before it
is ever attended to. The draft never ran its own last proposal d_K; when every draft is accepted it runs d_K together
with the next round's first token (two tokens in one step, `Transformer.decode`'s `lengths_b`).

Repetition control reads each row's text so far, drafts included: distribution i of both models is taken with the
context holding `d_1 .. d_{i-1}`, so p and q are exactly the distributions plain decoding would draw from.

A draft that is rarely right makes decoding slower, not faster (each round costs a target pass over K + 1 tokens and
K draft steps for about one token). After `PROBE_ROUNDS` rounds, if fewer than `min_acceptance` of the drafted tokens
were accepted, decoding goes on with the target alone, in a second loop that carries nothing of the draft's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections

from lm import kv_cache
from lm import model as model_lib
from lm.errors import ArgumentError
from lm.sampling import Sampling, Stops, distribution, sample, start_context

# Rounds of speculation before the acceptance rate decides whether speculation goes on.
PROBE_ROUNDS = 4
# Below this fraction of drafted tokens accepted, plain decoding is faster (lm.bench.decode measures both).
MIN_ACCEPTANCE = 0.3


def check_pair(target: ml_collections.ConfigDict, draft: ml_collections.ConfigDict, longest: int) -> None:
    """Raises `ArgumentError` unless the draft can propose tokens of the target's vocabulary for rows of `longest`
    tokens."""
    if draft.model.vocab_size != target.model.vocab_size:
        raise ArgumentError(f"the draft's config.model.vocab_size={draft.model.vocab_size} differs from the "
                            f"target's {target.model.vocab_size}: a draft must share the target's tokenizer")
    if longest > draft.model.max_seq_len:
        raise ArgumentError(f"prompt + max_new_tokens ({longest} tokens) exceeds the draft's "
                            f"config.model.max_seq_len={draft.model.max_seq_len}")


def check_tokenizers(target, draft, target_workdir: str, draft_workdir: str) -> None:
    """Raises `ArgumentError` unless the two runs' tokenizers are the same files."""
    if target.fingerprint() != draft.fingerprint():
        raise ArgumentError(f"--draft_workdir={draft_workdir} has another tokenizer than --workdir={target_workdir}: "
                            f"a draft must share the target's tokenizer")


def _probabilities(log_weights_bv: jax.Array) -> jax.Array:
    return jax.nn.softmax(log_weights_bv, axis=-1)


@functools.partial(jax.jit, static_argnames=("model", "draft", "draft_tokens", "min_acceptance", "max_new_tokens",
                                             "sampling", "stop_ids", "pad_id"))
def generate(params, draft_params, prompt_bt, start_b, rng, stop_strings, *, model: model_lib.Transformer,
             draft: model_lib.Transformer, draft_tokens: int, min_acceptance: float, max_new_tokens: int,
             sampling: Sampling, stop_ids: tuple[int, ...], pad_id: int):
    """Speculative decoding of left-padded prompts `prompt_bt` `[batch, prompt length]` (text from `start_b`).

    Returns `(reply_bt, lengths_b, counts)` as `lm.generate._generate` does, with `counts`: int32 scalars `rounds`
    (speculative rounds run), `proposed` and `accepted` (drafted tokens, summed over rows).
    """
    k = draft_tokens
    batch, prompt_length = prompt_bt.shape
    # Room for a whole round past the last reply token (rejected drafts are written, then overwritten).
    slots = prompt_length + max_new_tokens + k + 1
    caches = [kv_cache.KVCache.zeros(m.cfg, start_b, slots, prompt_length) for m in (model, draft)]
    # Both caches hold every token but each row's newest one (the prompt's last), which the next step runs.
    target_cache, draft_cache = [
        m.apply({"params": p}, prompt_bt[:, :-1], cache, method=m.decode)[1]
        for m, p, cache in zip((model, draft), (params, draft_params), caches)]
    context = start_context(prompt_bt, start_b, max_new_tokens, extra=k + 1)
    rows = jnp.arange(batch)
    plain_key, round_key = jax.random.split(rng)

    def reply_lengths(context):
        return context.length_b - prompt_length

    def plain_step(state):
        """One token of plain decoding by the target (after speculation stopped paying)."""
        target_cache, context, stops, done_b, step = state
        newest_b = context.tokens_bs[rows, context.length_b - 1]
        logits_bv, target_cache = model.apply({"params": params}, newest_b[:, None], target_cache, method=model.decode)
        token_b = sample(logits_bv, jax.random.fold_in(plain_key, step), sampling, context)
        token_b = jnp.where(done_b, pad_id, token_b)
        stops, stopped_b = stops.push(token_b, ~done_b)
        context = context.append(token_b)
        context = context.replace(length_b=jnp.where(done_b, context.length_b - 1, context.length_b))
        done_b = done_b | stopped_b | (reply_lengths(context) >= max_new_tokens)
        return target_cache, context, stops, done_b, step + 1

    def speculative_round(state):
        target_cache, draft_cache, context, stops, done_b, step, counts = state
        keys = jax.random.split(jax.random.fold_in(round_key, step), k + 2)
        length_b = context.length_b  # The newest token is at slot length_b - 1, not yet in either cache.
        # The draft: first catch up (its cache may lack the last round's final draft), then K proposals.
        draft_index_b = draft_cache.slots.index_b
        catch_up_bt = jnp.take_along_axis(context.tokens_bs, draft_index_b[:, None] + jnp.arange(2), axis=1)
        logits_bv, draft_cache = draft.apply({"params": draft_params}, catch_up_bt, draft_cache,
                                             length_b - draft_index_b, method=draft.decode)
        draft_context = context
        q_kbv, drafts = [], []
        for i in range(k):
            q_bv = distribution(logits_bv, sampling, draft_context)
            token_b = jax.random.categorical(keys[i], q_bv, axis=-1).astype(jnp.int32)
            q_kbv.append(q_bv)
            drafts.append(token_b)
            draft_context = draft_context.append(token_b)
            if i < k - 1:
                logits_bv, draft_cache = draft.apply({"params": draft_params}, token_b[:, None], draft_cache,
                                                     method=draft.decode)
        drafts_bk = jnp.stack(drafts, axis=1)
        # The target scores the newest token and the K drafts at once: p_1 .. p_{K+1}.
        verify_bt = jnp.concatenate([context.tokens_bs[rows, length_b - 1][:, None], drafts_bk], axis=1)
        logits_btv, target_cache = model.apply({"params": params}, verify_bt, target_cache, all_logits=True,
                                               method=model.decode)
        p_kbv = [distribution(logits_btv[:, i], sampling, draft_context.replace(length_b=length_b + i))
                 for i in range(k + 1)]
        # Accept d_i while u_i q_i(d_i) < p_i(d_i); n_b = the number accepted before the first rejection.
        # (Strictly below: a uniform draw of exactly 0 must not accept a token the target gives probability 0.)
        uniform_bk = jax.random.uniform(keys[k], (batch, k))
        accepted_bk = jnp.stack([
            uniform_bk[:, i] * _probabilities(q_kbv[i])[rows, drafts[i]] < _probabilities(p_kbv[i])[rows, drafts[i]]
            for i in range(k)], axis=1)
        n_b = jnp.sum(jnp.cumprod(accepted_bk, axis=1), axis=1)
        # The token after the accepted drafts: from the residual max(p - q, 0) at the rejection, else from p_{K+1}.
        p_bkv = jnp.stack([_probabilities(p) for p in p_kbv], axis=1)
        q_bkv = jnp.concatenate([jnp.stack([_probabilities(q) for q in q_kbv], axis=1),
                                 jnp.zeros_like(p_bkv[:, :1])], axis=1)
        p_bv, q_bv = p_bkv[rows, n_b], q_bkv[rows, n_b]
        residual_bv = jnp.maximum(p_bv - q_bv, 0.0)
        residual_bv = jnp.where(jnp.sum(residual_bv, -1, keepdims=True) > 0, residual_bv, p_bv)
        next_b = jax.random.categorical(keys[k + 1], jnp.log(residual_bv), axis=-1).astype(jnp.int32)
        # Emit d_1 .. d_n and the new token, stopping a row at a stop or at max_new_tokens.
        emitted_bt = jnp.where(jnp.arange(k + 1) < n_b[:, None], jnp.pad(drafts_bk, ((0, 0), (0, 1))),
                               next_b[:, None])
        live_b = ~done_b
        emitted_b = jnp.zeros((batch,), jnp.int32)
        for i in range(k + 1):
            within_b = live_b & (i <= n_b) & (reply_lengths(context) + emitted_b < max_new_tokens)
            stops, stopped_b = stops.push(emitted_bt[:, i], within_b)
            emitted_b = emitted_b + within_b
            live_b = live_b & ~stopped_b
        tokens_bs = context.tokens_bs.at[rows[:, None], length_b[:, None] + jnp.arange(k + 1)].set(
            jnp.where(jnp.arange(k + 1) < emitted_b[:, None], emitted_bt, pad_id), mode="drop")
        context = context.replace(tokens_bs=tokens_bs, length_b=length_b + emitted_b)
        done_b = done_b | ~live_b | (reply_lengths(context) >= max_new_tokens)
        # Roll back: the target keeps the newest token and the accepted drafts; the draft what it ran of those.
        target_cache = target_cache.with_slots(index_b=jnp.minimum(length_b + n_b, context.length_b - 1))
        draft_cache = draft_cache.with_slots(index_b=jnp.minimum(length_b + jnp.minimum(n_b, k - 1),
                                                                 context.length_b - 1))
        was_live_b = ~state[4]
        counts = {"rounds": counts["rounds"] + 1,
                  "proposed": counts["proposed"] + k * jnp.sum(was_live_b),
                  "accepted": counts["accepted"] + jnp.sum(jnp.where(was_live_b, n_b, 0))}
        return target_cache, draft_cache, context, stops, done_b, step + 1, counts

    def speculating(state):
        counts = state[-1]
        paying = (counts["rounds"] < PROBE_ROUNDS) | (counts["accepted"] >= min_acceptance * counts["proposed"])
        return ~jnp.all(state[4]) & paying

    zero = jnp.zeros((), jnp.int32)
    state = (target_cache, draft_cache, context, Stops.start(stop_ids, stop_strings, batch),
             jnp.zeros((batch,), bool), zero, {"rounds": zero, "proposed": zero, "accepted": zero})
    target_cache, _, context, stops, done_b, step, counts = jax.lax.while_loop(speculating, speculative_round, state)
    # Speculation stopped paying (or every row is done): the target goes on alone, in a loop of its own that carries
    # nothing of the draft's.
    _, context, _, _, _ = jax.lax.while_loop(lambda state: ~jnp.all(state[3]), plain_step,
                                             (target_cache, context, stops, done_b, step))
    reply_bt = context.tokens_bs[:, prompt_length:prompt_length + max_new_tokens]
    return reply_bt, reply_lengths(context), counts
