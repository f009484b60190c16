"""KV-cache decoding equals the full forward pass; sampling draws only from the tokens it should; seeds reproduce."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import config as lm_config
from lm import generate
from lm import model as model_lib

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
    cache = model_lib.KVCache.zeros(model.cfg, start_b, width + new_tokens)
    decode = jax.jit(lambda p, t, c: model.apply({"params": p}, t, c, method=model.decode))
    logits_bv, cache = decode(params, prompt_bt, cache)
    cached = [logits_bv]
    for i in range(new_tokens - 1):
        logits_bv, cache = decode(params, jnp.asarray([c[i] for c in continuations])[:, None], cache)
        cached.append(logits_bv)
    cached_btv = np.stack(cached, axis=1)
    assert int(cache.index) == width + new_tokens - 1
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
    cold = generate.generate(config, params, PROMPTS, max_new_tokens=8, sampling=generate.Sampling(1e-4), seed=3)
    assert cold == greedy


def test_same_seed_same_tokens_other_seed_other_tokens():
    config, _, params = small_config(2)
    sampling = generate.Sampling(temperature=1.0, top_k=50, top_p=0.95)
    first = generate.generate(config, params, PROMPTS, max_new_tokens=16, sampling=sampling, seed=7)
    again = generate.generate(config, params, PROMPTS, max_new_tokens=16, sampling=sampling, seed=7)
    other = generate.generate(config, params, PROMPTS, max_new_tokens=16, sampling=sampling, seed=8)
    assert first == again
    assert first != other


# A known distribution over 8 tokens, in a shuffled order so "most likely" is not "lowest id".
PROBS = np.array([0.05, 0.30, 0.02, 0.20, 0.15, 0.01, 0.25, 0.02])
DRAWS = 20_000


def draw(sampling, seed=0):
    logits_bv = jnp.tile(jnp.log(jnp.asarray(PROBS, jnp.float32)), (DRAWS, 1))
    tokens = np.asarray(jax.jit(generate.sample, static_argnums=2)(logits_bv, jax.random.key(seed), sampling))
    return np.bincount(tokens, minlength=len(PROBS)) / DRAWS


def assert_frequencies(frequencies, expected):
    # 5 standard errors of a binomial proportion: a false failure has probability ~1e-6 per token.
    tolerance = 5 * np.sqrt(expected * (1 - expected) / DRAWS) + 1e-12
    assert np.all(np.abs(frequencies - expected) <= tolerance), (frequencies, expected)


def test_plain_sampling_follows_the_distribution():
    assert_frequencies(draw(generate.Sampling(temperature=1.0)), PROBS)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_top_k_samples_only_the_k_most_likely_tokens(k):
    frequencies = draw(generate.Sampling(temperature=1.0, top_k=k))
    top = np.argsort(-PROBS)[:k]
    expected = np.zeros_like(PROBS)
    expected[top] = PROBS[top] / PROBS[top].sum()
    assert frequencies[np.setdiff1d(np.arange(len(PROBS)), top)].sum() == 0
    assert_frequencies(frequencies, expected)


@pytest.mark.parametrize("p,nucleus", [
    (0.2, [1]),  # Sorted masses 0.30, 0.25, 0.20, 0.15, ...: 0.30 alone reaches 0.2.
    (0.5, [1, 6]),  # 0.30 < 0.5 <= 0.55.
    (0.56, [1, 6, 3]),  # 0.55 < 0.56 <= 0.75.
    (0.85, [1, 6, 3, 4]),  # 0.75 < 0.85 <= 0.90.
])
def test_top_p_samples_only_the_smallest_set_reaching_p(p, nucleus):
    frequencies = draw(generate.Sampling(temperature=1.0, top_p=p))
    assert set(np.flatnonzero(frequencies).tolist()) == set(nucleus)
    expected = np.zeros_like(PROBS)
    expected[nucleus] = PROBS[nucleus] / PROBS[nucleus].sum()
    assert_frequencies(frequencies, expected)


def test_top_k_and_top_p_combine_and_temperature_sharpens():
    # top-k 3 keeps {1, 6, 3} (mass 0.75, renormalised 0.4, 0.333, 0.267); top-p 0.6 then keeps {1, 6}.
    frequencies = draw(generate.Sampling(temperature=1.0, top_k=3, top_p=0.6))
    expected = np.zeros_like(PROBS)
    expected[[1, 6]] = np.array([0.30, 0.25]) / 0.55
    assert_frequencies(frequencies, expected)
    cold = draw(generate.Sampling(temperature=0.5))
    sharpened = PROBS ** 2 / (PROBS ** 2).sum()
    assert_frequencies(cold, sharpened)


def test_bad_sampling_settings_are_rejected():
    for bad in [dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            generate.Sampling(**bad)
    config, _, params = small_config(2)
    with pytest.raises(ValueError, match="at least one token"):
        generate.generate(config, params, [[1], []], max_new_tokens=2)
