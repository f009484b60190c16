"""The attention implementations against dense references: the XLA path's causal query blocks, blockwise (flash)
attention, splash attention in Pallas interpret mode, ALiBi and additive biases, cuDNN's packed runs read as a mask."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import attention, errors, kv_cache


def _qkv(t, n=4, g=2, h=16, b=2, seed=0):
    # numpy's generator: jax.random would compile its ops eagerly for every new shape (seconds of a 2-core CPU).
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in ((b, t, n, h), (b, t, g, h),
                                                                                    (b, t, g, h)))


def _packed_segments(t, b=2):
    """Rows of several documents of uneven lengths, padding (id 0) at the end of the second row."""
    first = np.repeat([1, 2, 3], [t // 2 + 3, t // 4 - 1, t - (t // 2 + 3) - (t // 4 - 1)])
    second = np.concatenate([np.repeat([1, 2], [t // 3, t // 2]), np.zeros(t - t // 3 - t // 2, int)])
    return jnp.asarray(np.stack([first, second][:b]), jnp.int32)


def _dense_reference(q, k, v, segment_ids_bt=None, mask_b1ts=None):
    """The whole [t, t] causal (and segment) mask in one product: what the blocks must equal."""
    mask = attention.attention_mask(segment_ids_bt, q.shape[1], causal=True)
    if mask_b1ts is not None:
        mask = mask & mask_b1ts
    return attention._xla_attention(q, k, v, mask)


def _naive_attention(q_btnh, k_bsgh, v_bsgh, mask_b1ts=None, bias_bnts=None):
    """Textbook attention, independent of lm.attention: K/V heads repeated, the bias added to the full scores."""
    r = q_btnh.shape[2] // k_bsgh.shape[2]
    k_bsnh, v_bsnh = jnp.repeat(k_bsgh, r, axis=2), jnp.repeat(v_bsgh, r, axis=2)
    scores_bnts = jnp.einsum("btnh,bsnh->bnts", q_btnh, k_bsnh) / math.sqrt(q_btnh.shape[-1])
    if bias_bnts is not None:
        scores_bnts = scores_bnts + bias_bnts
    if mask_b1ts is not None:
        scores_bnts = jnp.where(mask_b1ts, scores_bnts, -1e30)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(scores_bnts, axis=-1), v_bsnh)


def _alibi_by_definition(num_heads, query_index_t, key_index_s):
    """`[1, n, t, s]`: `-slope * (query index - key index)` from numpy, the slopes from `alibi_slopes`."""
    slopes_n = attention.alibi_slopes(num_heads).astype(np.float64)
    distance_ts = np.asarray(query_index_t)[:, None] - np.asarray(key_index_s)[None, :]
    return jnp.asarray(-slopes_n[None, :, None, None] * distance_ts[None, None], jnp.float32)


def _out_and_grads(fn, q, k, v, *extra):
    """`fn(q, k, v, *extra)` and the gradients of all its arguments against a fixed random cotangent, in one jit."""
    cotangent = np.random.default_rng(7).standard_normal(q.shape)

    def run(*args):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(cotangent.astype(out.dtype))

    return jax.jit(run)(q, k, v, *extra)


# Jitted once for the tests: eagerly, each of their many small ops would compile on its own.
_segment_runs = jax.jit(attention.segment_runs, static_argnames="max_segments")
_runs_mask = jax.jit(attention.runs_mask, static_argnames=("length", "causal"))


def _assert_same(got, want, atol, value_atol=None, names="qkv"):
    """Values (within `value_atol`, by default `atol`) and gradients of two `_out_and_grads`."""
    (out_got, grads_got), (out_want, grads_want) = got, want
    np.testing.assert_allclose(out_got, out_want, rtol=0, atol=atol if value_atol is None else value_atol,
                               err_msg="values")
    for name, grad_got, grad_want in zip(names, grads_got, grads_want):
        np.testing.assert_allclose(grad_got, grad_want, rtol=0, atol=atol, err_msg=f"d{name}")


@pytest.mark.parametrize("length, blocks", [(512, 8), (256, 4), (192, 2), (128, 2), (96, 1), (64, 1)])
def test_causal_query_blocks_keep_blocks_of_at_least_the_minimum(length, blocks):
    assert attention.causal_query_blocks(length) == blocks
    assert length // blocks >= attention.MIN_QUERY_BLOCK or blocks == 1


@pytest.mark.parametrize("length, packed", [(256, False), (192, True)], ids=["4 blocks, one document", "2 blocks, packed"])
def test_blocked_causal_attention_equals_the_dense_mask(length, packed):
    """Values and the gradients of q, k, v; GQA (4 query heads on 2 key/value heads)."""
    q, k, v = _qkv(length)
    segment_ids = _packed_segments(length) if packed else None
    blocked = lambda q, k, v: attention.dot_product_attention(q, k, v, segment_ids_bt=segment_ids, causal=True)
    dense = lambda q, k, v: _dense_reference(q, k, v, segment_ids)
    _assert_same(_out_and_grads(blocked, q, k, v), _out_and_grads(dense, q, k, v), atol=1e-5, value_atol=2e-6)


def test_blocked_causal_attention_applies_an_explicit_mask_per_block():
    q, k, v = _qkv(256)
    mask_b1ts = jnp.asarray((np.random.default_rng(3).random((2, 1, 256, 256)) < 0.7) | np.eye(256, dtype=bool))
    got = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, causal=True, mask_b1ts=mask_b1ts))(q, k, v)
    want = jax.jit(lambda q, k, v: _dense_reference(q, k, v, mask_b1ts=mask_b1ts))(q, k, v)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)


def test_implementations_resolve_and_unknown_ones_are_refused():
    for name in ("xla", "cudnn", "blockwise", "splash"):
        assert attention.resolve_implementation(name, jnp.float32) == name
    assert attention.resolve_implementation("auto", jnp.bfloat16, backend="gpu") == "cudnn"
    assert attention.resolve_implementation("auto", jnp.bfloat16, backend="tpu") == "xla"
    with pytest.raises(ValueError, match="'flash' is not one of auto, xla, cudnn, blockwise, splash"):
        attention.resolve_implementation("flash", jnp.float32)


# --------------------------------------------------------------------------------------------------------------------
# Blockwise (flash) attention.


@pytest.mark.parametrize("length, block_q, block_k, causal, alibi", [
    (256, 64, 128, True, False),  # Whole blocks, the causal skip with key blocks larger than query blocks.
    (200, 64, 48, True, True),  # A length of no whole blocks (padded), ALiBi per block.
    (200, 48, 64, False, True),  # Not causal: every key block, padded keys masked.
], ids=["causal", "causal padded alibi", "full padded alibi"])
def test_blockwise_attention_equals_the_xla_reference(length, block_q, block_k, causal, alibi):
    """Values and the gradients of q, k, v at 1e-5 (fp32), packed rows, GQA (4 query heads on 2 key/value heads)."""
    q, k, v = _qkv(length)
    segment_ids = _packed_segments(length)
    options = dict(segment_ids_bt=segment_ids, causal=causal,
                   alibi_slopes_n=attention.alibi_slopes(4) if alibi else None)
    blockwise = lambda q, k, v: attention.dot_product_attention(
        q, k, v, implementation="blockwise", block_q=block_q, block_k=block_k, **options)
    reference = lambda q, k, v: attention.dot_product_attention(q, k, v, implementation="xla", **options)
    _assert_same(_out_and_grads(blockwise, q, k, v), _out_and_grads(reference, q, k, v), atol=1e-5)


def test_blockwise_attention_keeps_compiled_temporaries_under_a_tenth_of_the_reference_at_8k():
    """Forward and backward at t = 8192 (compiled, not run): the reference holds probabilities `[t, t]` per head
    (by causal query blocks), blockwise only O(t) buffers and one block of scores."""
    q = jax.ShapeDtypeStruct((1, 8192, 2, 16), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, 8192, 1, 16), jnp.float32)
    segment_ids = jax.ShapeDtypeStruct((1, 8192), jnp.int32)

    def temp_bytes(implementation):
        loss = lambda q, k, v, segment_ids: jnp.sum(attention.dot_product_attention(
            q, k, v, segment_ids_bt=segment_ids, implementation=implementation))
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, segment_ids).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    blockwise, reference = temp_bytes("blockwise"), temp_bytes("xla")
    assert blockwise <= 0.1 * reference, f"blockwise {blockwise / 2**20:.1f} MiB, xla {reference / 2**20:.1f} MiB"


# --------------------------------------------------------------------------------------------------------------------
# ALiBi and additive biases.


@pytest.mark.parametrize("num_heads", [1, 8, 12, 6])
def test_alibi_slopes_follow_the_definition(num_heads):
    """Press et al.'s geometric slopes, and BLOOM's rule for a head count that is not a power of two (transcribed from
    transformers' `_get_alibi_slopes`)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    want = [base ** power for power in range(1, closest + 1)]
    extra_base = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
    want += [extra_base ** power for power in range(1, 1 + 2 * min(closest, num_heads - closest), 2)]
    slopes = attention.alibi_slopes(num_heads)
    assert slopes.dtype == np.float32 and slopes.shape == (num_heads,)
    np.testing.assert_allclose(slopes, want, rtol=1e-6)
    if num_heads == 8:
        np.testing.assert_allclose(slopes, [2.0 ** -i for i in range(1, 9)])


def test_alibi_equals_the_bias_added_to_the_full_scores():
    """Packed rows, causal, against textbook attention: the XLA path by query blocks (values and gradients), and
    blockwise by blocks of 64 (values; its gradients equal the XLA path's, `test_blockwise_attention_equals_...`)."""
    length = 256
    q, k, v = _qkv(length)
    segment_ids = _packed_segments(length)
    position_t = np.arange(length)
    mask_b1ts = attention.attention_mask(segment_ids, length, causal=True)
    bias_1nts = _alibi_by_definition(4, position_t, position_t)
    want = _out_and_grads(lambda q, k, v: _naive_attention(q, k, v, mask_b1ts, bias_1nts), q, k, v)
    alibi = lambda implementation: jax.jit(lambda q, k, v: attention.dot_product_attention(
        q, k, v, segment_ids_bt=segment_ids, alibi_slopes_n=attention.alibi_slopes(4), implementation=implementation,
        block_q=64, block_k=64))
    _assert_same(_out_and_grads(alibi("xla"), q, k, v), want, atol=1e-5)
    np.testing.assert_allclose(alibi("blockwise")(q, k, v), want[0], rtol=0, atol=1e-5)


def test_alibi_rows_against_a_cache_equal_those_rows_of_the_full_sequence():
    """Decoding: 4 query rows written at slot 40 of a 64-slot cache (`query_offset` = 40, the slots after them
    holding garbage behind the cache mask) equal rows 40..43 of causal attention over the first 44 positions; the
    same through `blockwise`, which hands a cache's mask to the XLA path."""
    q, k, v = _qkv(64)
    _, garbage, _ = _qkv(64, seed=9)
    written_1s11 = np.arange(64)[None, :, None, None] < 44
    k_cache, v_cache = jnp.where(written_1s11, k, garbage), jnp.where(written_1s11, v, garbage)
    slopes = attention.alibi_slopes(4)
    full = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, alibi_slopes_n=slopes))(q, k, v)
    mask_b1ts = kv_cache.Slots(jnp.full((2,), 40, jnp.int32), jnp.zeros(2, jnp.int32)).mask(4, 64)
    for implementation in ("xla", "blockwise"):
        decode = jax.jit(lambda q, offset: attention.dot_product_attention(
            q, k_cache, v_cache, causal=False, mask_b1ts=mask_b1ts, alibi_slopes_n=slopes, query_offset=offset,
            implementation=implementation))
        np.testing.assert_allclose(decode(q[:, 40:44], jnp.int32(40)), full[:, 40:44], rtol=0, atol=2e-6,
                                   err_msg=implementation)


@pytest.mark.parametrize("causal", [True, False], ids=["causal query blocks", "masked"])
def test_an_additive_bias_in_xla_equals_it_added_to_the_full_scores(causal):
    """`bias_1nts` (T5's relative positions) with packing, values and the gradients of q, k, v and the bias."""
    length = 256
    q, k, v = _qkv(length)
    segment_ids = _packed_segments(length)
    bias_1nts = jnp.asarray(np.random.default_rng(4).standard_normal((1, 4, length, length)), jnp.float32)
    mask_b1ts = attention.attention_mask(segment_ids, length, causal)
    got = _out_and_grads(lambda q, k, v, bias: attention.dot_product_attention(
        q, k, v, segment_ids_bt=segment_ids, causal=causal, bias_1nts=bias), q, k, v, bias_1nts)
    want = _out_and_grads(lambda q, k, v, bias: _naive_attention(q, k, v, mask_b1ts, bias), q, k, v, bias_1nts)
    _assert_same(got, want, atol=1e-5, names=("q", "k", "v", "bias"))


@pytest.mark.parametrize("implementation, bias", [
    ("blockwise", "bias_1nts"), ("splash", "bias_1nts"), ("splash", "alibi_slopes_n")])
def test_a_bias_the_implementation_cannot_take_is_refused_naming_the_config_field(implementation, bias):
    q, k, v = _qkv(128)
    value = jnp.zeros((1, 4, 128, 128)) if bias == "bias_1nts" else attention.alibi_slopes(4)
    with pytest.raises(errors.ConfigError, match=rf"config\.model\.attention='{implementation}' cannot add"):
        attention.dot_product_attention(q, k, v, implementation=implementation, **{bias: value})


# --------------------------------------------------------------------------------------------------------------------
# Splash attention (Pallas interpret mode on a CPU).


def test_splash_attention_in_interpret_mode_equals_the_xla_reference():
    """Packed rows, causal, GQA; blocks of 128 on 256 positions (2 x 2 blocks, the upper one skipped)."""
    q, k, v = _qkv(256, b=1)
    segment_ids = _packed_segments(256, b=1)
    options = dict(segment_ids_bt=segment_ids, causal=True, block_q=128, block_k=128)
    splash = lambda q, k, v: attention.dot_product_attention(q, k, v, implementation="splash", **options)
    reference = lambda q, k, v: attention.dot_product_attention(q, k, v, implementation="xla", **options)
    _assert_same(_out_and_grads(splash, q, k, v), _out_and_grads(reference, q, k, v), atol=1e-5)


def test_splash_attention_refuses_lengths_off_its_lanes():
    q, k, v = _qkv(200)
    with pytest.raises(errors.ConfigError, match="multiples of 128, got 200 queries"):
        attention.dot_product_attention(q, k, v, implementation="splash")


# --------------------------------------------------------------------------------------------------------------------
# cuDNN's packed layout.


def test_segment_runs_give_cudnn_lengths_and_offsets_with_padding_as_a_run():
    segment_ids = jnp.asarray([[1, 1, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1]], jnp.int32)
    lengths, offsets = _segment_runs(segment_ids, max_segments=3)
    np.testing.assert_array_equal(offsets, [[0, 2, 5, -1], [0, -1, -1, -1]])
    np.testing.assert_array_equal(lengths, [[2, 3, 2], [7, -1, -1]])


@pytest.mark.parametrize("causal", [True, False])
def test_packed_offsets_path_equals_the_dense_mask_path(causal):
    """The lengths and offsets cuDNN gets, read back as a mask by the XLA implementation: the same attention as the
    segment-id mask, values and gradients (cuDNN's own call on them runs in launch/gpu_check.sh)."""
    length = 256
    q, k, v = _qkv(length)
    segment_ids = _packed_segments(length)
    runs = attention.count_segment_runs(np.asarray(segment_ids))
    assert runs == 3  # Rows of three documents, and of two documents and a padding run.
    lengths, offsets = _segment_runs(segment_ids, max_segments=runs)
    offsets_mask = _runs_mask(lengths, offsets, length=length, causal=causal)
    dense_mask = attention.attention_mask(segment_ids, length, causal)
    np.testing.assert_array_equal(offsets_mask, jnp.broadcast_to(dense_mask, offsets_mask.shape))
    # One function of the mask, so that both masks run the same compiled program: equal to the last bit.
    out_and_grads = lambda mask: _out_and_grads(lambda q, k, v, mask: attention._xla_attention(q, k, v, mask),
                                                q, k, v, mask)
    got, want = out_and_grads(jnp.broadcast_to(offsets_mask, offsets_mask.shape)), out_and_grads(
        jnp.broadcast_to(dense_mask, offsets_mask.shape))
    np.testing.assert_array_equal(got[0], want[0])
    for grad_got, grad_want in zip(got[1][:3], want[1][:3]):
        np.testing.assert_array_equal(grad_got, grad_want)


def test_a_batch_with_more_runs_than_the_bound_is_refused_in_one_line():
    segment_ids = np.asarray([[1, 1, 2, 3, 0, 0], [1, 2, 2, 2, 2, 2]], np.int32)
    assert attention.count_segment_runs(segment_ids) == 4
    attention.check_segment_runs(segment_ids, 4)
    attention.check_segment_runs(segment_ids, 0)  # 0: the mask path, no bound.
    with pytest.raises(errors.DataError, match=r"packs 4 segments .* config\.model\.attention_max_segments=3"):
        attention.check_segment_runs(segment_ids, 3)
