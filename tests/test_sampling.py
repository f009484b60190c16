"""The sampler (`lm.sampling`): draws follow the distribution top-k / top-p / min-p leave; repetition control and the
warpers equal Hugging Face's logits processors; OpenAI's penalties follow their formula; stop strings are found on
the reply's bytes however it was tokenised; in `lm.generate` they hold over whole replies."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import config as lm_config
from lm import generate
from lm import model as model_lib
from lm import sampling

# A known distribution over 8 tokens, in a shuffled order so "most likely" is not "lowest id".
PROBS = np.array([0.05, 0.30, 0.02, 0.20, 0.15, 0.01, 0.25, 0.02])
DRAWS = 20_000


def draw(settings, seed=0):
    logits_bv = jnp.tile(jnp.log(jnp.asarray(PROBS, jnp.float32)), (DRAWS, 1))
    tokens = np.asarray(jax.jit(sampling.sample, static_argnums=2)(logits_bv, jax.random.key(seed), settings))
    return np.bincount(tokens, minlength=len(PROBS)) / DRAWS


def assert_frequencies(frequencies, expected):
    # 5 standard errors of a binomial proportion: a false failure has probability ~1e-6 per token.
    tolerance = 5 * np.sqrt(expected * (1 - expected) / DRAWS) + 1e-12
    assert np.all(np.abs(frequencies - expected) <= tolerance), (frequencies, expected)


def test_plain_sampling_follows_the_distribution():
    assert_frequencies(draw(sampling.Sampling(temperature=1.0)), PROBS)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_top_k_samples_only_the_k_most_likely_tokens(k):
    frequencies = draw(sampling.Sampling(temperature=1.0, top_k=k))
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
    frequencies = draw(sampling.Sampling(temperature=1.0, top_p=p))
    assert set(np.flatnonzero(frequencies).tolist()) == set(nucleus)
    expected = np.zeros_like(PROBS)
    expected[nucleus] = PROBS[nucleus] / PROBS[nucleus].sum()
    assert_frequencies(frequencies, expected)


def test_top_k_and_top_p_combine_and_temperature_sharpens():
    # top-k 3 keeps {1, 6, 3} (mass 0.75, renormalised 0.4, 0.333, 0.267); top-p 0.6 then keeps {1, 6}.
    frequencies = draw(sampling.Sampling(temperature=1.0, top_k=3, top_p=0.6))
    expected = np.zeros_like(PROBS)
    expected[[1, 6]] = np.array([0.30, 0.25]) / 0.55
    assert_frequencies(frequencies, expected)
    cold = draw(sampling.Sampling(temperature=0.5))
    sharpened = PROBS ** 2 / (PROBS ** 2).sum()
    assert_frequencies(cold, sharpened)


def test_bad_sampling_settings_are_rejected():
    for bad in [dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5), dict(min_p=1.5),
                dict(repetition_penalty=0.0), dict(frequency_penalty=3.0), dict(presence_penalty=-2.5),
                dict(no_repeat_ngram_size=-1)]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            sampling.Sampling(**bad)


def _context(rows, width, vocab, seed, reply_from=None):
    """A Context of `rows` left-padded with tokens that must be ignored, and the unpadded rows."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, width - 2, rows)
    tokens = rng.integers(0, vocab, (rows, width)).astype(np.int32)  # Padding holds real-looking tokens.
    start = width - lengths
    reply_start = start + (lengths // 2 if reply_from is None else reply_from)
    context = sampling.Context(jnp.asarray(tokens), jnp.asarray(start, jnp.int32), jnp.asarray(reply_start, jnp.int32),
                               jnp.full((rows,), width, jnp.int32))
    return context, [tokens[b, start[b]:] for b in range(rows)], [tokens[b, reply_start[b]:] for b in range(rows)]


@pytest.mark.parametrize("settings", [
    dict(repetition_penalty=1.3),
    dict(repetition_penalty=0.7, temperature=0.8, top_k=12),
    dict(no_repeat_ngram_size=2),
    dict(no_repeat_ngram_size=3, repetition_penalty=1.2, temperature=1.2, top_p=0.8),
    dict(temperature=0.7, min_p=0.1),
    dict(repetition_penalty=1.5, temperature=1.0, top_k=20, top_p=0.9, min_p=0.05),
])
def test_the_distribution_equals_hugging_face_logits_processors(settings):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    vocab, rows = 24, 6
    context, texts, _ = _context(rows, 20, vocab, seed=1)
    logits_bv = jax.random.normal(jax.random.key(2), (rows, vocab)) * 3
    settings = {"temperature": 1.0, **settings}
    got = np.asarray(jax.nn.softmax(sampling.distribution(logits_bv, sampling.Sampling(**settings), context)))
    processors = transformers.LogitsProcessorList()
    if "repetition_penalty" in settings:
        processors.append(transformers.RepetitionPenaltyLogitsProcessor(settings["repetition_penalty"]))
    if "no_repeat_ngram_size" in settings:
        processors.append(transformers.NoRepeatNGramLogitsProcessor(settings["no_repeat_ngram_size"]))
    processors.append(transformers.TemperatureLogitsWarper(settings["temperature"]))
    if "top_k" in settings:
        processors.append(transformers.TopKLogitsWarper(settings["top_k"]))
    if "top_p" in settings:
        processors.append(transformers.TopPLogitsWarper(settings["top_p"]))
    if "min_p" in settings:
        processors.append(transformers.MinPLogitsWarper(settings["min_p"]))
    for b, text in enumerate(texts):
        scores = processors(torch.tensor(text[None], dtype=torch.long), torch.tensor(np.asarray(logits_bv[b:b + 1])))
        want = torch.softmax(scores, dim=-1).numpy()[0]
        np.testing.assert_array_equal(got[b] == 0, want == 0, err_msg=f"row {b}: removed tokens")
        np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=1e-7, err_msg=f"row {b}")


def test_frequency_and_presence_penalties_count_the_reply_only():
    vocab, rows = 16, 4
    context, _, replies = _context(rows, 24, vocab, seed=3)
    logits_bv = jax.random.normal(jax.random.key(4), (rows, vocab))
    settings = sampling.Sampling(frequency_penalty=0.4, presence_penalty=0.7)
    got = np.asarray(sampling.controlled(logits_bv, settings, context))
    for b, reply in enumerate(replies):
        count_v = np.bincount(reply, minlength=vocab)
        want = np.asarray(logits_bv[b]) - 0.4 * count_v - 0.7 * (count_v > 0)
        np.testing.assert_allclose(got[b], want, rtol=1e-6, atol=1e-6)


def test_greedy_with_repetition_control_is_the_argmax_of_the_controlled_logits():
    context, _, _ = _context(4, 16, 12, seed=5)
    logits_bv = jax.random.normal(jax.random.key(6), (4, 12))
    settings = sampling.Sampling(repetition_penalty=2.0, no_repeat_ngram_size=2)
    controlled = sampling.controlled(logits_bv, settings, context)
    np.testing.assert_array_equal(sampling.sample(logits_bv, jax.random.key(0), settings, context),
                                  jnp.argmax(controlled, -1))
    assert not np.array_equal(jnp.argmax(controlled, -1), jnp.argmax(logits_bv, -1))  # The control mattered.


def _stop_checks(pieces, stops, token_ids):
    """`push` over `token_ids` one at a time: the first step at which a stop string has appeared, or None."""
    table = sampling.StopStrings.build(stops, pieces)
    tail, filled = table.empty_tail(1)
    push = jax.jit(table.push)
    for step, token in enumerate(token_ids):
        tail, filled, stopped = push(tail, filled, jnp.asarray([token], jnp.int32))
        if bool(stopped[0]):
            return step
    return None


def test_stop_strings_are_found_across_token_boundaries_on_the_bytes():
    rng = np.random.default_rng(7)
    pieces = [b"", b"a", b"b", b"ab", b"ba", b"\n", b"abc", b"c", b"\xc3", b"\xa9", "é".encode(), b"xyz c"]
    stops = ["cab", "\n\n", "é!", "bc"]
    for trial in range(40):
        token_ids = rng.integers(0, len(pieces), 30).tolist()
        texts = [b"".join(pieces[t] for t in token_ids[:i + 1]) for i in range(len(token_ids))]
        want = next((i for i, text in enumerate(texts) if any(s.encode() in text for s in stops)), None)
        assert _stop_checks(pieces, stops, token_ids) == want, (trial, token_ids)


def small_model(vocab=64):
    config = lm_config.load("configs/tiny.py", **{
        "model.num_layers": 2, "model.d_model": 64, "model.num_heads": 4, "model.num_kv_heads": 2,
        "model.mlp_dim": 128, "model.vocab_size": vocab, "model.max_seq_len": 96})
    return config, nn.unbox(model_lib.init(model_lib.build(config), jax.random.key(1)))


def test_generated_rows_never_repeat_an_ngram_and_penalties_change_greedy_text():
    config, params = small_model()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 64, rng.integers(2, 10)).tolist() for _ in range(6)]
    plain = generate.generate(config, params, prompts, max_new_tokens=40)
    assert any(len(set(zip(r, r[1:]))) < len(r) - 1 for r in plain)  # Greedy decoding of this model repeats itself.
    settings = sampling.Sampling(no_repeat_ngram_size=2)
    for prompt, reply in zip(prompts, generate.generate(config, params, prompts, max_new_tokens=40,
                                                        sampling=settings)):
        text = prompt + reply
        bigrams = list(zip(text, text[1:]))
        assert len(bigrams) == len(set(bigrams)), text
    penalised = generate.generate(config, params, prompts, max_new_tokens=40,
                                  sampling=sampling.Sampling(repetition_penalty=1.5))
    assert penalised != plain
    assert np.mean([len(set(r)) for r in penalised]) > np.mean([len(set(r)) for r in plain])


def test_stop_strings_end_rows_in_generate_and_are_cut_from_the_text():
    config, params = small_model()
    pieces = [bytes([97 + i % 26]) * (1 + i % 3) for i in range(64)]  # A made-up tokenizer's pieces.
    prompts = [[5, 9, 13], [40, 41]]
    replies = generate.generate(config, params, prompts, max_new_tokens=30)
    texts = [b"".join(pieces[t] for t in reply).decode() for reply in replies]
    stop = texts[0][7:10]  # Three characters from the middle of the first reply, maybe across tokens.
    stopped = generate.generate(config, params, prompts, max_new_tokens=30,
                                stop_strings=sampling.StopStrings.build([stop], pieces))
    for reply, short in zip(replies, stopped):
        text = b"".join(pieces[t] for t in reply).decode()
        if stop in text:  # Ends with the token that completed the stop string.
            end = next(i for i in range(len(reply)) if stop in b"".join(pieces[t] for t in reply[:i + 1]).decode())
            assert short == reply[:end + 1]
        else:
            assert short == reply
    assert generate.cut_at_stop("x = 1\n\ny = 2", ["\n\n", "y"]) == "x = 1"


def test_per_row_settings_give_each_row_its_own_settings_distribution():
    """A server batch (`RowSampling`): each row's distribution equals that of its settings applied alone."""
    vocab, rows = 32, 6
    context, _, _ = _context(rows, 20, vocab, seed=8)
    logits_bv = jax.random.normal(jax.random.key(9), (rows, vocab)) * 2
    settings = [sampling.Sampling(), sampling.Sampling(temperature=0.7, top_k=5),
                sampling.Sampling(temperature=1.3, top_p=0.6, repetition_penalty=1.4),
                sampling.Sampling(temperature=1.0, min_p=0.2, frequency_penalty=0.5, presence_penalty=0.3),
                sampling.Sampling(repetition_penalty=2.0), sampling.Sampling(temperature=0.9, top_k=3, top_p=0.9)]
    got = np.asarray(jax.jit(sampling.distribution)(logits_bv, sampling.RowSampling.of(settings), context))
    for b, alone in enumerate(settings):
        row = jax.tree.map(lambda x: x[b:b + 1], context)
        want = np.asarray(sampling.distribution(logits_bv[b:b + 1], alone, row))[0]
        np.testing.assert_array_equal(np.isinf(got[b]), np.isinf(want), err_msg=f"row {b}")
        np.testing.assert_allclose(got[b][~np.isinf(want)], want[~np.isinf(want)], rtol=1e-6, err_msg=f"row {b}")
    with pytest.raises(ValueError, match="no_repeat_ngram_size cannot differ per row"):
        sampling.RowSampling.of([sampling.Sampling(no_repeat_ngram_size=2)])
