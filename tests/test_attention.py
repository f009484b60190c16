"""The attention implementations against the dense-mask reference: the XLA path's causal query blocks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import attention


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
