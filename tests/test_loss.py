"""The blockwise cross-entropy against a full-logits fp32 reference: values, gradients, options, sharding, memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lm import loss as loss_lib


def reference(hidden, kernel, targets, weights=None, z_loss=0.0, label_smoothing=0.0, logit_softcap=None):
    """Full `[N, V]` logits at HIGHEST precision: the definition the blockwise loss must equal."""
    logits = jnp.einsum("nd,dv->nv", hidden.astype(jnp.float32), kernel.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
    if logit_softcap is not None:
        logits = logit_softcap * jnp.tanh(logits / logit_softcap)
    vocab = logits.shape[-1]
    lse = jax.nn.logsumexp(logits, axis=-1)
    log_probs = logits - lse[:, None]
    labels = (1 - label_smoothing) * jax.nn.one_hot(targets, vocab) + label_smoothing / vocab
    per_token = -jnp.sum(labels * log_probs, axis=-1) + z_loss * lse ** 2
    weights = jnp.ones(targets.shape) if weights is None else weights
    return jnp.sum(weights * per_token) / jnp.maximum(jnp.sum(weights), 1e-30) * (jnp.sum(weights) > 0)


def inputs(n, v, d, dtype=jnp.float32, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    hidden = jax.random.normal(k1, (n, d), jnp.float32).astype(dtype)
    kernel = (jax.random.normal(k2, (d, v), jnp.float32) / np.sqrt(d)).astype(dtype)
    targets = jax.random.randint(k3, (n,), 0, v)
    return hidden, kernel, targets


def value_and_grads(fn, hidden, kernel, targets, weights=None, **options):
    return jax.jit(jax.value_and_grad(lambda h, k: fn(h, k, targets, weights, **options), argnums=(0, 1)))(
        hidden, kernel)


def chunked(hidden, kernel, targets, weights=None, chunk_size=100, **options):
    return loss_lib.cross_entropy(hidden, kernel, targets, weights, chunk_size=chunk_size, **options)[0]


def assert_matches(got, want, rtol):
    (loss, (dh, dk)), (ref_loss, (ref_dh, ref_dk)) = got, want
    np.testing.assert_allclose(loss, ref_loss, rtol=rtol)
    for a, b in ((dh, ref_dh), (dk, ref_dk)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


@pytest.mark.parametrize("chunk_size", [1, 100, 512, 4096])
@pytest.mark.parametrize("n,v,d", [(256, 512, 128), (252, 507, 128), (252, 507, 123)])
def test_fp32_matches_full_logits_reference(n, v, d, chunk_size):
    hidden, kernel, targets = inputs(n, v, d)
    got = value_and_grads(chunked, hidden, kernel, targets, chunk_size=chunk_size)
    assert_matches(got, value_and_grads(reference, hidden, kernel, targets), rtol=1e-5)


def test_bf16_inputs_within_bf16_tolerance():
    hidden, kernel, targets = inputs(252, 507, 128, jnp.bfloat16)
    got = value_and_grads(chunked, hidden, kernel, targets, chunk_size=100)
    assert got[1][0].dtype == jnp.bfloat16 and got[1][1].dtype == jnp.bfloat16
    assert_matches(got, value_and_grads(reference, hidden, kernel, targets), rtol=2e-2)


def test_ignored_tokens_and_cotangent_scaling():
    hidden, kernel, targets = inputs(252, 507, 64)
    weights = (jax.random.uniform(jax.random.key(7), (252,)) > 0.2).astype(jnp.float32)
    got = value_and_grads(chunked, hidden, kernel, targets, weights)
    assert_matches(got, value_and_grads(reference, hidden, kernel, targets, weights), rtol=1e-5)
    scaled = jax.jit(jax.grad(lambda h, k: 3.0 * chunked(h, k, targets, weights), argnums=(0, 1)))(hidden, kernel)
    np.testing.assert_allclose(scaled[1], 3.0 * np.asarray(got[1][1]), rtol=1e-5, atol=1e-7)


def test_all_ignored_batch_gives_zero_loss_and_gradients():
    hidden, kernel, targets = inputs(64, 100, 32)
    loss, (dh, dk) = value_and_grads(chunked, hidden, kernel, targets, jnp.zeros(64))
    assert float(loss) == 0.0 and not np.any(dh) and not np.any(dk)


@pytest.mark.parametrize("options", [dict(z_loss=1e-2), dict(label_smoothing=0.1), dict(logit_softcap=2.0)],
                         ids=["z_loss", "label_smoothing", "softcap"])
def test_options_match_their_reference_formula_and_gradient(options):
    hidden, kernel, targets = inputs(252, 507, 64)
    got = value_and_grads(chunked, hidden, kernel, targets, **options)
    assert_matches(got, value_and_grads(reference, hidden, kernel, targets, **options), rtol=1e-5)


def test_confident_bf16_predictions_keep_accurate_gradients():
    # Orthonormal kernel columns and hidden states along the target's column: target logit 12, others 0, so
    # p(target) = e^12 / (e^12 + 49) > 0.999 and dlogits = p - onehot is tiny everywhere.
    columns, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(64, 50)))
    targets = jnp.asarray(np.random.default_rng(1).integers(0, 50, 128))
    kernel = jnp.asarray(columns, jnp.bfloat16)
    hidden = (12.0 * jnp.take(kernel.T.astype(jnp.float32), targets, axis=0)).astype(jnp.bfloat16)
    logits = jnp.einsum("nd,dv->nv", hidden.astype(jnp.float32), kernel.astype(jnp.float32))
    assert float(jnp.min(jax.nn.softmax(logits)[jnp.arange(128), targets])) >= 0.999
    got = value_and_grads(chunked, hidden, kernel, targets, chunk_size=16)
    want = value_and_grads(reference, hidden, kernel, targets)
    for a, b in zip(got[1], want[1]):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-2 * np.abs(b).max())


def test_aux_metrics():
    hidden, kernel, targets = inputs(100, 50, 16)
    _, aux = loss_lib.cross_entropy(hidden, kernel, targets, chunk_size=7)
    logits = hidden @ kernel
    np.testing.assert_allclose(aux["accuracy"], np.mean(np.argmax(logits, -1) == targets), rtol=1e-6)
    np.testing.assert_allclose(aux["log_z"], np.mean(jax.nn.logsumexp(logits, -1)), rtol=1e-5)
    assert float(aux["weight_sum"]) == 100.0


@pytest.mark.parametrize("kernel_spec", [P(None, "x"), P("x", None)], ids=["vocab_sharded", "embed_sharded"])
def test_sharded_inputs_on_8_devices_equal_one_device(kernel_spec):
    mesh = Mesh(np.array(jax.devices()[:8]), ("x",))
    hidden, kernel, targets = inputs(256, 512, 128)
    want = value_and_grads(chunked, hidden, kernel, targets)
    hidden_s = jax.device_put(hidden, NamedSharding(mesh, P("x", None)))
    kernel_s = jax.device_put(kernel, NamedSharding(mesh, kernel_spec))
    targets_s = jax.device_put(targets, NamedSharding(mesh, P("x")))
    got = value_and_grads(chunked, hidden_s, kernel_s, targets_s)
    assert_matches(got, want, rtol=1e-5)


def temp_bytes(n, d, v, chunk_size, dtype=jnp.float32):
    hidden = jax.ShapeDtypeStruct((n, d), dtype)
    kernel = jax.ShapeDtypeStruct((d, v), dtype)
    targets = jax.ShapeDtypeStruct((n,), jnp.int32)
    fn = jax.value_and_grad(lambda h, k, t: chunked(h, k, t, chunk_size=chunk_size), argnums=(0, 1))
    return jax.jit(fn).lower(hidden, kernel, targets).compile().memory_analysis().temp_size_in_bytes


def fp32_block_bytes(n, chunk_size):
    """Bytes of one `[tokens, chunk]` fp32 block of logits (or of their gradient)."""
    return n * chunk_size * 4


# The bounds below are what `memory_analysis().temp_size_in_bytes` reports (jax/jaxlib 0.10.2, XLA:CPU) plus about
# 15% headroom, so a change that adds a block-sized buffer fails while XLA's buffer assignment, which moves by a few
# percent between versions and backends, does not. Naive full logits would need far more (see each test).


def test_memory_at_256k_vocabulary_stays_under_256_mb():
    # Measured 118,588,688 bytes: 3.53 blocks of [8192, 1024] fp32 (33,554,432 each: the block's logits, their
    # gradient, and pieces of the next). Bound: 4 blocks = 134,217,728 (+13%). Full fp32 logits would be 8.4 GB.
    temps = temp_bytes(8192, 2304, 256_000, 1024)
    assert temps <= 256e6  # The requirement.
    assert temps <= 4 * fp32_block_bytes(8192, 1024) == 134_217_728, f"{temps:,}"


def test_temporaries_grow_with_chunk_size_not_vocabulary():
    # Measured: 5,267,920 bytes (vocabulary 16,384) and 5,268,688 (65,536: 768 bytes more for 4x the vocabulary),
    # 2.51 blocks of [1024, 512] fp32 (2,097,152 each); chunk 4096: 46,158,224, 2.75 blocks of [1024, 4096]
    # (16,777,216 each), 8.76x the chunk-512 program for 8x the chunk.
    small_vocab = temp_bytes(1024, 256, 16_384, 512)
    large_vocab = temp_bytes(1024, 256, 65_536, 512)
    large_chunk = temp_bytes(1024, 256, 65_536, 4096)
    print(f"temporaries: {small_vocab:,} (v 16384), {large_vocab:,} (v 65536), {large_chunk:,} (v 65536, chunk 4096)")
    assert small_vocab <= 3 * fp32_block_bytes(1024, 512) == 6_291_456  # +19%
    # 4x the vocabulary: within 1% (52 KB; a [1024, 49152] fp32 buffer would be 201 MB, a [49152] one 197 KB).
    assert abs(large_vocab - small_vocab) <= 0.01 * small_vocab
    # 8x the chunk: temporaries grow with it, to at most 3 blocks of the bigger chunk (+9%).
    assert 7 * large_vocab <= large_chunk <= 3 * fp32_block_bytes(1024, 4096) == 50_331_648


def test_bf16_memory_on_cpu_stays_under_2_5_gb():
    # XLA:CPU materialises one uint16 view of the bf16 kernel (2304 x 256,000 x 2 = 1,179,648,000 bytes, see
    # lm.loss._bits); the rest is block-sized. Measured 1,427,735,832 bytes: the view + 248,087,832 (7.4 blocks of
    # [8192, 1024] fp32). Bound: 1.64e9 (measured + 15%). Naive: 19,137 MB.
    temps = temp_bytes(8192, 2304, 256_000, 1024, jnp.bfloat16)
    assert temps <= 2.5e9  # The requirement.
    assert temps <= 1.64e9, f"{temps:,}"


def test_no_tokens_by_vocabulary_array_in_the_compiled_program():
    n, v, d = 252, 507, 123
    hidden, kernel, targets = (jax.ShapeDtypeStruct((n, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32),
                               jax.ShapeDtypeStruct((n,), jnp.int32))
    fn = jax.value_and_grad(lambda h, k, t: chunked(h, k, t, chunk_size=100), argnums=(0, 1))
    hlo = jax.jit(fn).lower(hidden, kernel, targets).compile().as_text()
    assert f"[{n},{v}]" not in hlo and f"[{v},{n}]" not in hlo
    _, width, head_width = loss_lib.chunk_plan(v, 100)  # 6 blocks: one of 82 columns, five of 85.
    assert f"[{n},{width}]" in hlo and f"[{n},{head_width}]" in hlo


@pytest.mark.parametrize("vocab", [1, 2, 7, 100, 507, 512, 50_257, 256_000])
@pytest.mark.parametrize("chunk_size", [1, 3, 100, 512, 4096, 1 << 20])
def test_blocks_tile_the_vocabulary_exactly(vocab, chunk_size):
    num_blocks, width, head_width = loss_lib.chunk_plan(vocab, chunk_size)
    assert 1 <= head_width <= width <= chunk_size
    assert head_width + (num_blocks - 1) * width == vocab
    assert num_blocks == -(-vocab // chunk_size)


def test_result_is_independent_of_chunk_size():
    hidden, kernel, targets = inputs(100, 507, 32)
    results = [value_and_grads(chunked, hidden, kernel, targets, chunk_size=c) for c in (1, 7, 128, 506, 507, 10_000)]
    for got in results[1:]:
        assert_matches(got, results[0], rtol=2e-6)


def test_leading_batch_axes_and_fractional_weights_with_weight_gradient():
    hidden, kernel, targets = inputs(4 * 63, 101, 32)
    weights = jax.random.uniform(jax.random.key(3), (4 * 63,)) * (jax.random.uniform(jax.random.key(4), (252,)) > 0.2)
    fns = {"chunked": lambda h, k, w: chunked(h.reshape(4, 63, 32), k, targets.reshape(4, 63), w.reshape(4, 63),
                                              chunk_size=30),
           "reference": lambda h, k, w: reference(h, k, targets, w)}
    got, want = (jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))(hidden, kernel, weights) for fn in fns.values())
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for a, b in zip(got[1], want[1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


def test_all_options_together_with_ignored_tokens():
    hidden, kernel, targets = inputs(252, 507, 64)
    weights = (jax.random.uniform(jax.random.key(7), (252,)) > 0.2).astype(jnp.float32)
    options = dict(z_loss=1e-3, label_smoothing=0.2, logit_softcap=3.0)
    got = value_and_grads(chunked, hidden, kernel, targets, weights, chunk_size=64, **options)
    assert_matches(got, value_and_grads(reference, hidden, kernel, targets, weights, **options), rtol=1e-5)


def test_bf16_hidden_with_fp32_kernel_computes_in_bf16_and_returns_fp32_kernel_gradient():
    hidden, kernel, targets = inputs(252, 507, 128)
    hidden = hidden.astype(jnp.bfloat16)
    loss, (dh, dk) = value_and_grads(chunked, hidden, kernel, targets)
    assert dh.dtype == jnp.bfloat16 and dk.dtype == jnp.float32
    assert_matches((loss, (dh, dk)), value_and_grads(reference, hidden, kernel.astype(jnp.bfloat16), targets),
                   rtol=2e-2)


def test_forward_only_metrics_without_gradient():
    hidden, kernel, targets = inputs(252, 507, 64)
    weights = (jax.random.uniform(jax.random.key(7), (252,)) > 0.2).astype(jnp.float32)
    fn = jax.jit(lambda h, k: loss_lib.cross_entropy(h, k, targets, weights, chunk_size=100, z_loss=1e-2))
    loss, aux = fn(hidden, kernel)
    logits = np.asarray(hidden, np.float64) @ np.asarray(kernel, np.float64)
    lse = np.log(np.sum(np.exp(logits), -1))
    w = np.asarray(weights, np.float64)
    nll = lse - logits[np.arange(252), targets]
    np.testing.assert_allclose(aux["nll"], np.sum(w * nll) / w.sum(), rtol=1e-5)
    np.testing.assert_allclose(aux["z_loss"], 1e-2 * np.sum(w * lse ** 2) / w.sum(), rtol=1e-5)
    np.testing.assert_allclose(loss, aux["nll"] + aux["z_loss"], rtol=1e-6)
    np.testing.assert_allclose(aux["log_z"], np.sum(w * lse) / w.sum(), rtol=1e-5)
    assert float(aux["weight_sum"]) == float(w.sum())


def test_accuracy_counts_tokens_whose_target_is_the_argmax():
    hidden, kernel, _ = inputs(100, 50, 16)
    argmax = jnp.argmax(hidden @ kernel, -1)
    targets = jnp.where(jnp.arange(100) < 30, argmax, (argmax + 1) % 50)  # Exactly 30% right.
    weights = jnp.where(jnp.arange(100) < 10, 0.0, 1.0)  # 20 of the 90 counted tokens are right.
    _, aux = loss_lib.cross_entropy(hidden, kernel, targets, weights, chunk_size=7)
    np.testing.assert_allclose(aux["accuracy"], 20 / 90, rtol=1e-6)


@pytest.mark.parametrize("logit_softcap", [None, 3.0])
def test_token_log_probs_equal_the_full_log_softmax_and_its_argmax(logit_softcap):
    hidden, kernel, _ = inputs(96, 50, 16)
    logits = jnp.einsum("nd,dv->nv", hidden, kernel, precision=jax.lax.Precision.HIGHEST)
    if logit_softcap is not None:
        logits = logit_softcap * jnp.tanh(logits / logit_softcap)
    argmax = jnp.argmax(logits, -1)
    targets = jnp.where(jnp.arange(96) % 3 == 0, argmax, (argmax + 1 + jnp.arange(96)) % 50)
    log_probs, is_argmax = loss_lib.token_log_probs(hidden.reshape(4, 24, 16), kernel, targets.reshape(4, 24),
                                                    chunk_size=7, logit_softcap=logit_softcap)
    assert log_probs.shape == is_argmax.shape == (4, 24)
    expected = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[:, None], axis=1)[:, 0]
    np.testing.assert_allclose(log_probs.reshape(-1), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(is_argmax.reshape(-1), targets == argmax)


@pytest.mark.parametrize("logit_softcap", [None, 3.0])
def test_token_log_probs_gradients_equal_the_full_log_softmax_and_form_no_tokens_by_vocabulary_array(logit_softcap):
    """Gradients of a weighted sum of per-token log-probs (what a preference objective differentiates)."""
    n, v, d = 96, 507, 16
    hidden, kernel, targets = inputs(n, v, d, seed=3)
    cotangent = jax.random.normal(jax.random.key(4), (n,))  # Any per-token weights, negative ones included.

    def full(h, k):
        logits = jnp.einsum("nd,dv->nv", h, k, precision=jax.lax.Precision.HIGHEST)
        if logit_softcap is not None:
            logits = logit_softcap * jnp.tanh(logits / logit_softcap)
        return jnp.sum(cotangent * jnp.take_along_axis(jax.nn.log_softmax(logits), targets[:, None], axis=1)[:, 0])

    def blockwise(h, k):
        log_prob, _ = loss_lib.token_log_probs(h, k, targets, chunk_size=100, logit_softcap=logit_softcap)
        return jnp.sum(cotangent * log_prob)

    (value, grads), (want_value, want_grads) = (jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(hidden, kernel)
                                                for fn in (blockwise, full))
    np.testing.assert_allclose(value, want_value, atol=1e-5 * n)  # A sum of n terms of either sign.
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    hlo = jax.jit(jax.grad(blockwise, argnums=(0, 1))).lower(hidden, kernel).compile().as_text()
    assert f"[{n},{v}]" not in hlo and f"[{v},{n}]" not in hlo


@pytest.mark.parametrize("bad,match", [
    (dict(kernel=jnp.zeros((8, 10))), "same d"),
    (dict(targets=jnp.zeros((5,), jnp.int32)), "targets must have shape"),
    (dict(targets=jnp.zeros((4,), jnp.float32)), "integers"),
    (dict(weights=jnp.ones((5,))), "weights must have the shape"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(label_smoothing=1.0), "label_smoothing"),
    (dict(logit_softcap=0.0), "logit_softcap"),
])
def test_bad_arguments_raise_naming_the_argument(bad, match):
    args = dict(hidden=jnp.zeros((4, 16)), kernel=jnp.zeros((16, 10)), targets=jnp.zeros((4,), jnp.int32),
                weights=None, chunk_size=4)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        loss_lib.cross_entropy(args.pop("hidden"), args.pop("kernel"), args.pop("targets"), args.pop("weights"),
                               **args)


def test_bf16_plain_slicing_path_used_off_cpu_gives_the_same_results(monkeypatch):
    # On CPU, bf16 kernels are sliced as uint16 bits (lm.loss._bits); GPUs and TPUs slice bf16 directly.
    hidden, kernel, targets = inputs(252, 507, 64, jnp.bfloat16)
    via_bits = value_and_grads(chunked, hidden, kernel, targets)
    monkeypatch.setattr(loss_lib, "_bits", lambda x: x)
    plain = value_and_grads(chunked, hidden, kernel, targets)
    for a, b in zip(jax.tree.leaves(via_bits), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
