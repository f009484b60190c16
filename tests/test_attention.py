"""The attention implementations against the dense-mask reference: the XLA path's causal query blocks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import attention, errors


def _qkv(t, n=4, g=2, h=16, b=2, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (b, t, n, h)), jax.random.normal(keys[1], (b, t, g, h)),
            jax.random.normal(keys[2], (b, t, g, h)))


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


@pytest.mark.parametrize("length, blocks", [(512, 8), (256, 4), (192, 2), (128, 2), (96, 1), (64, 1)])
def test_causal_query_blocks_keep_blocks_of_at_least_the_minimum(length, blocks):
    assert attention.causal_query_blocks(length) == blocks
    assert length // blocks >= attention.MIN_QUERY_BLOCK or blocks == 1


@pytest.mark.parametrize("length", [256, 192])
@pytest.mark.parametrize("packed", [False, True], ids=["one document", "packed"])
def test_blocked_causal_attention_equals_the_dense_mask(length, packed):
    """Values and the gradients of q, k, v; GQA (4 query heads on 2 key/value heads)."""
    q, k, v = _qkv(length)
    segment_ids = _packed_segments(length) if packed else None
    cotangent = jax.random.normal(jax.random.key(7), q.shape)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * cotangent)

    blocked = lambda q, k, v: attention.dot_product_attention(q, k, v, segment_ids_bt=segment_ids, causal=True)
    dense = lambda q, k, v: _dense_reference(q, k, v, segment_ids)
    np.testing.assert_allclose(blocked(q, k, v), dense(q, k, v), rtol=0, atol=2e-6)
    grads_blocked = jax.grad(loss(blocked), argnums=(0, 1, 2))(q, k, v)
    grads_dense = jax.grad(loss(dense), argnums=(0, 1, 2))(q, k, v)
    for name, got, want in zip("qkv", grads_blocked, grads_dense):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=f"d{name}")


def test_blocked_causal_attention_applies_an_explicit_mask_per_block():
    q, k, v = _qkv(256)
    mask_b1ts = jax.random.bernoulli(jax.random.key(3), 0.7, (2, 1, 256, 256)) | jnp.eye(256, dtype=bool)
    got = attention.dot_product_attention(q, k, v, causal=True, mask_b1ts=mask_b1ts)
    np.testing.assert_allclose(got, _dense_reference(q, k, v, mask_b1ts=mask_b1ts), rtol=0, atol=2e-6)


def test_segment_runs_give_cudnn_lengths_and_offsets_with_padding_as_a_run():
    segment_ids = jnp.asarray([[1, 1, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1]], jnp.int32)
    lengths, offsets = attention.segment_runs(segment_ids, max_segments=3)
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
    lengths, offsets = attention.segment_runs(segment_ids, max_segments=runs)
    offsets_mask = attention.runs_mask(lengths, offsets, length, causal)
    dense_mask = attention.attention_mask(segment_ids, length, causal)
    np.testing.assert_array_equal(offsets_mask, jnp.broadcast_to(dense_mask, offsets_mask.shape))
    cotangent = jax.random.normal(jax.random.key(5), q.shape)

    def loss(mask):
        return lambda q, k, v: jnp.sum(attention._xla_attention(q, k, v, mask) * cotangent)

    np.testing.assert_array_equal(attention._xla_attention(q, k, v, offsets_mask),
                                  attention._xla_attention(q, k, v, dense_mask))
    for got, want in zip(jax.grad(loss(offsets_mask), argnums=(0, 1, 2))(q, k, v),
                         jax.grad(loss(dense_mask), argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_array_equal(got, want)


def test_a_batch_with_more_runs_than_the_bound_is_refused_in_one_line():
    segment_ids = np.asarray([[1, 1, 2, 3, 0, 0], [1, 2, 2, 2, 2, 2]], np.int32)
    assert attention.count_segment_runs(segment_ids) == 4
    attention.check_segment_runs(segment_ids, 4)
    attention.check_segment_runs(segment_ids, 0)  # 0: the mask path, no bound.
    with pytest.raises(errors.DataError, match=r"packs 4 segments .* config\.model\.attention_max_segments=3"):
        attention.check_segment_runs(segment_ids, 3)
