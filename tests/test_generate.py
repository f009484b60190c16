"""KV-cache decoding equals the full forward pass (contiguous and paged); seeds reproduce; stops end rows."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import config as lm_config
from lm import generate
from lm import kv_cache
from lm import model as model_lib
from lm import sampling

VOCAB = 256


def small_config(num_kv_heads, **overrides):
    config = lm_config.load("configs/tiny.py", **{
        "model.num_layers": 2, "model.d_model": 64, "model.num_heads": 4, "model.num_kv_heads": num_kv_heads,
        "model.mlp_dim": 128, "model.vocab_size": VOCAB, "model.max_seq_len": 64, **overrides})
    model = model_lib.build(config)
    params = nn.unbox(model_lib.init(model, jax.random.key(1)))
    return config, model, params


def full_logits(model, params, tokens):
    """fp32 logits `[len(tokens), vocab]` of one unpadded sequence from the ordinary forward pass."""
    tokens_1t = jnp.asarray(tokens, jnp.int32)[None]
    hidden_1td = model.apply({"params": params}, tokens_1t)
    return np.asarray(model.apply({"params": params}, hidden_1td, method=model.logits)[0])


PROMPTS = [[5, 17, 3], [9, 8, 7, 6, 5, 4, 3, 2, 1, 10, 11], [42, 43, 44, 45, 46, 47, 48]]


@pytest.mark.parametrize("num_kv_heads,overrides", [
    (4, {}),  # MHA
    (2, {}),  # GQA
    (1, {"model.scan_layers": False}),  # MQA, unrolled layers
    (2, {"model.position_embedding": "learned", "model.norm_position": "post", "model.norm": "layernorm"}),
    (2, {"model.position_embedding": "relative", "model.norm": "scalenorm"}),
    (4, {"model.position_embedding": "alibi", "model.scan_layers": False}),
])
def test_kv_cache_logits_equal_full_forward_at_every_position(num_kv_heads, overrides):
    config, model, params = small_config(num_kv_heads, **overrides)
    new_tokens = 10
    rng = np.random.default_rng(0)
    continuations = [rng.integers(0, VOCAB, new_tokens).tolist() for _ in PROMPTS]
    # Left-pad the prompts to 16 slots, as lm.generate does, then prefill and feed the continuation token by token.
    width = 16
    start_b = jnp.asarray([width - len(p) for p in PROMPTS])
    prompt_bt = jnp.asarray([[0] * (width - len(p)) + p for p in PROMPTS])
    cache = kv_cache.KVCache.zeros(model.cfg, start_b, width + new_tokens)
    decode = jax.jit(lambda p, t, c: model.apply({"params": p}, t, c, method=model.decode))
    logits_bv, cache = decode(params, prompt_bt, cache)
    cached = [logits_bv]
    for i in range(new_tokens - 1):
        logits_bv, cache = decode(params, jnp.asarray([c[i] for c in continuations])[:, None], cache)
        cached.append(logits_bv)
    cached_btv = np.stack(cached, axis=1)
    assert int(cache.slots.index_b[0]) == width + new_tokens - 1
    for b, (prompt, continuation) in enumerate(zip(PROMPTS, continuations)):
        reference_tv = full_logits(model, params, prompt + continuation)
        # Position len(prompt) - 1 + i predicts continuation token i.
        expected_tv = reference_tv[len(prompt) - 1:len(prompt) - 1 + new_tokens]
        np.testing.assert_allclose(cached_btv[b], expected_tv, rtol=1e-5, atol=1e-5 * np.abs(expected_tv).max())


def test_greedy_generation_follows_the_full_forward_argmax():
    config, model, params = small_config(2)
    completions = generate.generate(config, params, PROMPTS, max_new_tokens=12)
    for prompt, completion in zip(PROMPTS, completions):
        assert len(completion) == 12
        logits_tv = full_logits(model, params, prompt + completion)
        assert completion == np.argmax(logits_tv[len(prompt) - 1:-1], axis=-1).tolist()


def test_generation_stops_at_eos_and_pads_nothing_after_it():
    config, model, params = small_config(2)
    greedy = generate.generate(config, params, PROMPTS, max_new_tokens=6)
    eos = greedy[0][2]  # Row 0 produces it at step 2 at the latest (greedy is deterministic).
    stopped = generate.generate(config, params, PROMPTS, max_new_tokens=6, eos_id=eos)
    first = greedy[0].index(eos)
    assert stopped[0] == greedy[0][:first + 1]
    for row, full in zip(stopped, greedy):
        assert row == (full[:full.index(eos) + 1] if eos in full else full)


def test_rows_stop_at_any_stop_id_and_a_longer_prompt_length_changes_nothing():
    config, _, params = small_config(2)
    greedy = generate.generate(config, params, PROMPTS, max_new_tokens=6)
    stops = {greedy[0][3], greedy[1][1]}
    stopped = generate.generate(config, params, PROMPTS, max_new_tokens=6, stop_ids=sorted(stops), prompt_length=40)
    for row, full in zip(stopped, greedy):
        ends = [i for i, token in enumerate(full) if token in stops]
        assert row == (full[:ends[0] + 1] if ends else full)
    with pytest.raises(generate.ArgumentError, match="prompt_length=2 is shorter"):
        generate.generate(config, params, PROMPTS, max_new_tokens=6, prompt_length=2)


def test_temperature_to_zero_equals_greedy():
    config, _, params = small_config(2)
    greedy = generate.generate(config, params, PROMPTS, max_new_tokens=8)
    cold = generate.generate(config, params, PROMPTS, max_new_tokens=8, sampling=sampling.Sampling(1e-4), seed=3)
    assert cold == greedy


def test_same_seed_same_tokens_other_seed_other_tokens():
    config, _, params = small_config(2)
    settings = sampling.Sampling(temperature=1.0, top_k=50, top_p=0.95)
    first = generate.generate(config, params, PROMPTS, max_new_tokens=16, sampling=settings, seed=7)
    again = generate.generate(config, params, PROMPTS, max_new_tokens=16, sampling=settings, seed=7)
    other = generate.generate(config, params, PROMPTS, max_new_tokens=16, sampling=settings, seed=8)
    assert first == again
    assert first != other


def test_empty_prompts_are_rejected():
    config, _, params = small_config(2)
    with pytest.raises(ValueError, match="at least one token"):
        generate.generate(config, params, [[1], []], max_new_tokens=2)


@pytest.mark.parametrize("overrides", [
    {},
    {"model.position_embedding": "alibi"},
    {"model.position_embedding": "relative", "model.scan_layers": False},
    {"model.attention_type": "mla", "model.mla.kv_lora_rank": 16, "model.mla.qk_rope_head_dim": 8,
     "model.mla.qk_nope_head_dim": 8, "model.mla.v_head_dim": 8},
], ids=["rope", "alibi", "relative", "mla"])
def test_paged_cache_with_ragged_chunks_equals_the_full_forward(overrides):
    """Rows on shuffled pages of one pool, prefilled in chunks of up to 4 tokens while other rows already decode one
    token per step (`lengths_b`), give the full forward's logits at each row's newest position."""
    config, model, params = small_config(2, **overrides)
    rng = np.random.default_rng(1)
    texts = [rng.integers(0, VOCAB, n).tolist() for n in (9, 17, 4)]
    prompt_lengths = [7, 13, 1]
    page_size, row_pages = 4, 6
    pages_bj = 1 + rng.permutation(len(texts) * row_pages).reshape(len(texts), row_pages)  # Page 0 is never used.
    cache = kv_cache.KVCache.paged(model.cfg, 1 + pages_bj.size, page_size, pages_bj, np.zeros(3, np.int32))
    decode = jax.jit(lambda p, t, c, n: model.apply({"params": p}, t, c, n, method=model.decode))
    full = [full_logits(model, params, text) for text in texts]  # Causal: position p's logits see text[:p + 1].
    done = [0, 0, 0]
    checked = 0
    while any(d < len(t) for d, t in zip(done, texts)):
        # Rows still in their prompt take up to 4 of its tokens; the others one token of their text.
        counts = [min(p - d, 4) if d < p else min(1, len(t) - d) for d, p, t in zip(done, prompt_lengths, texts)]
        chunk_bt = np.zeros((3, 4), np.int32)
        for b, (d, n) in enumerate(zip(done, counts)):
            chunk_bt[b, :n] = texts[b][d:d + n]
        logits_bv, cache = decode(params, jnp.asarray(chunk_bt), cache, jnp.asarray(counts, jnp.int32))
        for b, (d, n) in enumerate(zip(done, counts)):
            if n:
                np.testing.assert_allclose(np.asarray(logits_bv[b]), full[b][d + n - 1], rtol=1e-4, atol=1e-4,
                                           err_msg=f"row {b} at position {d + n - 1}")
                checked += 1
        done = [d + n for d, n in zip(done, counts)]
    assert checked == 16  # 4 + 8 + 4 steps with tokens.
    np.testing.assert_array_equal(np.asarray(cache.slots.index_b), [len(t) for t in texts])
