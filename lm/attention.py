"""Attention implementations behind one function, chosen by `config.model.attention`.

Axis letters (the package legend, `lm/__init__.py`): b batch, t query positions, s key/value positions, n query
heads, g key/value heads (groups), r = n // g query heads per key/value head, h head dimension.

Every implementation takes packed documents (`segment_ids_bt`), grouped-query heads without repeating K/V in memory,
and the causal mask; they differ in the additive biases of positions they can put on the scores (ALiBi's
`alibi_slopes_n`, T5's learned `bias_1nts`) and in where they run. One that cannot take a bias raises a
`ConfigError` naming `config.model.attention`.

- `xla`: the reference. Grouped-query einsums, fp32 scores and softmax; causal self-attention runs by query blocks,
  each against the keys up to its last row only (no work on the masked upper triangle of blocks). Takes everything:
  ALiBi and `bias_1nts` (both sliced per query block), an explicit `mask_b1ts` (decoding against a KV cache). Works
  on every backend and is what CPU tests run; its scores and probabilities are `[t, s]` per head (by blocks).
- `cudnn`: `jax.nn.dot_product_attention(implementation='cudnn')`, the fused flash-attention kernel of cuDNN on NVIDIA
  GPUs (bf16/fp16 inputs only). Packed documents become a boolean mask, which cuDNN takes as a bias, unless
  `max_segments` (`config.model.attention_max_segments`) is set: then cuDNN gets each row's documents as the lengths
  and offsets of at most that many runs (`segment_runs`; no `[b, 1, t, t]` array at all), falling back to the mask
  with a warning where JAX or cuDNN lack the packed layout. ALiBi and `bias_1nts` reach cuDNN as one materialised
  `[1 or b, n, t, s]` bias (and then packed documents as a mask, not as runs).
- `blockwise`: flash attention in plain JAX for backends without a fused kernel (`blockwise_attention`): queries in
  blocks, an online softmax over key blocks, a custom VJP that recomputes each block's scores from the saved
  logsumexp (FlashAttention-2). Nothing `[t, s]` is ever formed, causal blocks above the diagonal are skipped, and
  lengths that are not a multiple of the blocks are padded. Takes ALiBi (computed per block); not `bias_1nts`.
  With `mask_b1ts` (decoding: a few query rows against a cache) it runs the `xla` path, which is the right tool there.
- `splash`: TPU splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`, `splash_attention`): a causal
  or full mask per head, `SegmentIds` for packed documents, grouped-query heads natively; lengths must be multiples
  of 128. No additive bias (neither ALiBi nor `bias_1nts`); with `mask_b1ts` it runs the `xla` path, as `blockwise`.
  Off TPU it runs in Pallas interpret mode (slow; for tests). It is called under `jit` as is: on a sharded mesh it
  would need a `shard_map` over the batch and head axes (as MaxText does), which is not wired in yet.
- `auto`: `cudnn` on GPU for half-precision inputs, `xla` otherwise.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from lm.errors import ConfigError, DataError

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "blockwise", "splash")
MIN_QUERY_BLOCK = 64  # Rows of the smallest query block of the XLA path's causal split (`causal_query_blocks`).
SPLASH_LANES = 128  # Splash attention's blocks (and so its lengths) are multiples of the TPU's 128 lanes.
# The score of a masked pair in the XLA and blockwise paths: finite, so that a row without any allowed key (the padded
# query rows of `blockwise_attention`) stays free of NaN.
_MASKED = float(jnp.finfo(jnp.float32).min)


def resolve_implementation(implementation: str, dtype, backend: str | None = None) -> str:
    """Maps `auto` to the fastest implementation available for `backend` (default: this process's) and dtype."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} is not one of {', '.join(IMPLEMENTATIONS)}")
    if implementation != "auto":
        return implementation
    half_precision = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    backend = jax.default_backend() if backend is None else backend
    return "cudnn" if backend == "gpu" and half_precision else "xla"


def attention_mask(segment_ids_bt: jax.Array | None, length: int, causal: bool) -> jax.Array | None:
    """Boolean mask `[b or 1, 1, t, t]`: True where query t may attend key s.

    Causal keeps s <= t; segments keep pairs within one document (packed sequences never attend across documents).
    Returns None when there is nothing to mask.
    """
    mask = None
    if causal:
        index_t = jnp.arange(length)
        mask = (index_t[:, None] >= index_t[None, :])[None, None]
    if segment_ids_bt is not None:
        same_segment_b1ts = (segment_ids_bt[:, None, :, None] == segment_ids_bt[:, None, None, :])
        mask = same_segment_b1ts if mask is None else mask & same_segment_b1ts
    return mask


# --------------------------------------------------------------------------------------------------------------------
# ALiBi (Press et al. 2022, "Train short, test long").


def alibi_slopes(num_heads: int) -> np.ndarray:
    """fp32 `[n]`: ALiBi's slope of each head.

    For n a power of two the geometric sequence `2^(-8 i / n)`, i = 1..n. Otherwise the n' = 2^floor(log2 n) slopes
    of n' heads, then the first n - n' of the odd-numbered slopes (i = 1, 3, 5, ...) of 2n' heads, which interleave
    with them: the rule of the paper's code and of BLOOM's `build_alibi_tensor` in Hugging Face transformers.
    """
    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = 2.0 ** (-8.0 * np.arange(1, closest + 1) / closest)
    extra = 2.0 ** (-8.0 * np.arange(1, 2 * (num_heads - closest), 2) / (2 * closest))
    return np.concatenate([slopes, extra]).astype(np.float32)


def alibi_bias(alibi_slopes_n: jax.Array, query_index_t: jax.Array, key_index_s: jax.Array) -> jax.Array:
    """fp32 `[n, t, s]`: ALiBi's `-slope_n * (query_index - key_index)` for queries and keys at these key indices."""
    distance_ts = (query_index_t[:, None] - key_index_s[None, :]).astype(jnp.float32)
    return -jnp.asarray(alibi_slopes_n, jnp.float32)[:, None, None] * distance_ts[None]


def _bias(alibi_slopes_n, bias_1nts, query_offset, rows: slice, keys: slice) -> jax.Array | None:
    """fp32 `[1 or b, n, t, s]`: the additive bias of query rows `rows` (at key indices `query_offset + row`) against
    keys `keys`, both slices with explicit bounds; None without ALiBi or `bias_1nts`."""
    bias = None if bias_1nts is None else bias_1nts[:, :, rows, keys].astype(jnp.float32)
    if alibi_slopes_n is not None:
        query_index_t = query_offset + jnp.arange(rows.start, rows.stop)
        alibi_1nts = alibi_bias(alibi_slopes_n, query_index_t, jnp.arange(keys.start, keys.stop))[None]
        bias = alibi_1nts if bias is None else bias + alibi_1nts
    return bias


# --------------------------------------------------------------------------------------------------------------------
# The XLA reference.


def _xla_attention(q_btnh, k_bsgh, v_bsgh, mask_b1ts, bias_bnts=None) -> jax.Array:
    """Attention with an optional boolean mask `[b or 1, 1, t, s]` and fp32 additive bias `[b or 1, n, t, s]`."""
    b, t, n, h = q_btnh.shape
    s, g = k_bsgh.shape[1], k_bsgh.shape[2]
    r = n // g
    # Heads-first layouts, each group's r query heads stacked along the query axis (q = r * t): both products are then
    # plain batched matmuls, batch axes (b, g) first and the contracted axis last. On the [b, t, g, r, h] layout
    # XLA:CPU transposes the scores around every dot of the backward pass (forward and backward 1.4x slower).
    q_bgqh = q_btnh.reshape(b, t, g, r, h).transpose(0, 2, 3, 1, 4).reshape(b, g, r * t, h)
    k_bgsh, v_bgsh = k_bsgh.transpose(0, 2, 1, 3), v_bsgh.transpose(0, 2, 1, 3)
    scores_bgqs = jnp.einsum("bgqh,bgsh->bgqs", q_bgqh, k_bgsh, preferred_element_type=jnp.float32) * (h ** -0.5)
    if mask_b1ts is not None or bias_bnts is not None:
        scores_bgrts = scores_bgqs.reshape(b, g, r, t, s)
        if bias_bnts is not None:
            scores_bgrts = scores_bgrts + bias_bnts.reshape(bias_bnts.shape[0], g, r, t, s)
        if mask_b1ts is not None:
            # [b, 1, t, s] -> [b, 1, 1, t, s] broadcasts over (g, r). A large finite negative keeps fully masked rows
            # (never produced by a causal mask, which always allows the diagonal) free of NaN.
            scores_bgrts = jnp.where(mask_b1ts[:, :, None], scores_bgrts, _MASKED)
        scores_bgqs = scores_bgrts.reshape(b, g, r * t, s)
    probs_bgqs = jax.nn.softmax(scores_bgqs, axis=-1).astype(v_bsgh.dtype)
    out_bgqh = jnp.einsum("bgqs,bgsh->bgqh", probs_bgqs, v_bgsh, preferred_element_type=jnp.float32)
    hv = v_bsgh.shape[-1]  # The value heads' width may differ from the query/key heads' (MLA).
    out_btnh = out_bgqh.reshape(b, g, r, t, hv).transpose(0, 3, 1, 2, 4).reshape(b, t, n, hv)
    return out_btnh.astype(q_btnh.dtype)


def dot_product_attention(
    q_btnh: jax.Array,
    k_bsgh: jax.Array,
    v_bsgh: jax.Array,
    *,
    segment_ids_bt: jax.Array | None = None,
    causal: bool = True,
    mask_b1ts: jax.Array | None = None,
    alibi_slopes_n: jax.Array | np.ndarray | None = None,
    query_offset: int | jax.Array = 0,
    bias_1nts: jax.Array | None = None,
    implementation: str = "xla",
    max_segments: int = 0,
    block_q: int = 512,
    block_k: int = 512,
) -> jax.Array:
    """Multi-head / grouped-query / multi-query attention.

    Args:
      q_btnh: queries `[batch, length, heads, head_dim]`.
      k_bsgh, v_bsgh: keys and values `[batch, length, kv_heads, head_dim]`; `heads % kv_heads == 0`.
      segment_ids_bt: int `[batch, length]` document ids of packed rows; tokens attend only within their segment.
      causal: mask future keys (query and key positions aligned, t == s).
      mask_b1ts: an explicit boolean mask `[batch, 1, length, kv_length]` (decoding against a KV cache, where
        t != s; see `lm.kv_cache.Slots.mask`), combined with the others. `blockwise` and `splash` hand it to `xla`.
      alibi_slopes_n: fp32 `[heads]` ALiBi slopes (`alibi_slopes`): adds `-slope * (query_index - key_index)` to
        the scores. Not differentiated (the slopes are fixed). `xla`, `cudnn` and `blockwise` only.
      query_offset: int or int32 scalar, the key index of the first query row, for ALiBi's distances: 0 in training,
        the cache's write index when decoding. The masks do not read it (`mask_b1ts` carries a cache's causality).
      bias_1nts: an additive fp32 bias `[1 or batch, heads, length, kv_length]` on the scores (T5's relative
        positions), differentiable. `xla` and `cudnn` only.
      implementation: `xla`, `cudnn`, `blockwise`, `splash` or `auto` (see module docstring).
      max_segments: cuDNN with `segment_ids_bt`: above 0, pass the packed documents to cuDNN as the lengths and
        offsets of at most this many runs of equal ids per row (`segment_runs`) instead of a `[b, 1, t, t]` mask;
        the caller guarantees the bound (`check_segment_runs`). 0: the mask.
      block_q, block_k: query and key rows per block of `blockwise` (clamped to the lengths) and `splash` (rounded
        down to a multiple of 128 that divides the length).

    Returns:
      `[batch, length, heads, head_dim]` in the dtype of `q_btnh`.
    """
    implementation = resolve_implementation(implementation, q_btnh.dtype)
    _check_bias_support(implementation, alibi_slopes_n, bias_1nts)
    if implementation in ("blockwise", "splash") and mask_b1ts is not None:
        implementation = "xla"  # Decoding: a few query rows against a cache, a matrix-vector product.
    if implementation == "blockwise":
        return blockwise_attention(q_btnh, k_bsgh, v_bsgh, segment_ids_bt=segment_ids_bt, causal=causal,
                                   alibi_slopes_n=alibi_slopes_n, query_offset=query_offset, block_q=block_q,
                                   block_k=block_k)
    if implementation == "splash":
        return splash_attention(q_btnh, k_bsgh, v_bsgh, segment_ids_bt=segment_ids_bt, causal=causal,
                                block_q=block_q, block_k=block_k)
    t, s = q_btnh.shape[1], k_bsgh.shape[1]
    if implementation == "cudnn":
        bias_bnts = _bias(alibi_slopes_n, bias_1nts, query_offset, slice(0, t), slice(0, s))
        if segment_ids_bt is not None and max_segments > 0 and mask_b1ts is None and bias_bnts is None:
            out_btnh = _cudnn_packed_attention(q_btnh, k_bsgh, v_bsgh, segment_ids_bt, causal, max_segments)
            if out_btnh is not None:
                return out_btnh
        mask = _combine(attention_mask(segment_ids_bt, t, causal=False), mask_b1ts)
        # cuDNN takes the bias in the inputs' dtype (it adds the mask to it as a large negative of that dtype).
        bias = None if bias_bnts is None else bias_bnts.astype(q_btnh.dtype)
        return jax.nn.dot_product_attention(
            q_btnh, k_bsgh, v_bsgh, bias=bias, mask=mask, is_causal=causal, implementation="cudnn")
    if causal and t == s:
        return _xla_causal_attention(q_btnh, k_bsgh, v_bsgh, segment_ids_bt, mask_b1ts, alibi_slopes_n, query_offset,
                                     bias_1nts)
    mask = _combine(attention_mask(segment_ids_bt, t, causal), mask_b1ts)
    bias_bnts = _bias(alibi_slopes_n, bias_1nts, query_offset, slice(0, t), slice(0, s))
    return _xla_attention(q_btnh, k_bsgh, v_bsgh, mask, bias_bnts)


def _check_bias_support(implementation: str, alibi_slopes_n, bias_1nts) -> None:
    """Raises `ConfigError` for a bias the implementation cannot add to its scores."""
    if bias_1nts is not None and implementation in ("blockwise", "splash"):
        raise ConfigError(f"config.model.attention={implementation!r} cannot add a learned [heads, t, s] bias "
                          f"(T5's relative positions) to its scores; use 'xla', 'cudnn' or 'auto'")
    if alibi_slopes_n is not None and implementation == "splash":
        raise ConfigError("config.model.attention='splash' cannot add ALiBi's bias to its scores (the kernel takes "
                          "masks only); use 'blockwise', 'xla', 'cudnn' or 'auto'")


def causal_query_blocks(length: int) -> int:
    """How many query blocks `_xla_causal_attention` splits a length into: the most of 8, 4, 2 that divide it into
    blocks of at least `MIN_QUERY_BLOCK` rows (smaller blocks cost more in per-dot overhead than they save), else 1."""
    return next((k for k in (8, 4, 2) if length % k == 0 and length // k >= MIN_QUERY_BLOCK), 1)


def _xla_causal_attention(q_btnh, k_bsgh, v_bsgh, segment_ids_bt, mask_b1ts, alibi_slopes_n=None, query_offset=0,
                          bias_1nts=None) -> jax.Array:
    """Causal self-attention (t == s) by query blocks: block i, rows `[i c, (i + 1) c)`, against keys `[0, (i + 1) c)`
    only, since every later key is masked for it. With k blocks that skips (k - 1) / 2k of the scores, softmax and
    both products (37.5% at k = 4; 8% of the whole train step of the CPU benchmark, `lm.bench.peer`); each block is
    exact (the same softmax over the same unmasked keys), so the result equals `_xla_attention` with the full mask.
    Biases are sliced (ALiBi computed) per block the same way.
    """
    t = q_btnh.shape[1]
    c = t // causal_query_blocks(t)
    out_blocks = []
    for start in range(0, t, c):
        stop = start + c
        query_t, key_s = jnp.arange(start, stop), jnp.arange(stop)
        block_mask = (query_t[:, None] >= key_s[None, :])[None, None]
        if segment_ids_bt is not None:
            block_mask = block_mask & (segment_ids_bt[:, None, start:stop, None] == segment_ids_bt[:, None, None, :stop])
        if mask_b1ts is not None:
            block_mask = block_mask & mask_b1ts[:, :, start:stop, :stop]
        block_bias = _bias(alibi_slopes_n, bias_1nts, query_offset, slice(start, stop), slice(0, stop))
        out_blocks.append(_xla_attention(q_btnh[:, start:stop], k_bsgh[:, :stop], v_bsgh[:, :stop], block_mask,
                                         block_bias))
    return jnp.concatenate(out_blocks, axis=1)


def _combine(mask_a, mask_b):
    if mask_a is None or mask_b is None:
        return mask_b if mask_a is None else mask_a
    return mask_a & mask_b


# --------------------------------------------------------------------------------------------------------------------
# Blockwise (flash) attention in plain JAX.


class _Blocks(NamedTuple):
    """The static layout of `_flash`: rows per query and key block, causal, and the unpadded key length (keys at or
    beyond it are padding and masked)."""

    block_q: int
    block_k: int
    causal: bool
    key_length: int


def blockwise_attention(
    q_btnh: jax.Array,
    k_bsgh: jax.Array,
    v_bsgh: jax.Array,
    *,
    segment_ids_bt: jax.Array | None = None,
    causal: bool = True,
    alibi_slopes_n: jax.Array | np.ndarray | None = None,
    query_offset: int | jax.Array = 0,
    block_q: int = 512,
    block_k: int = 512,
) -> jax.Array:
    """Flash attention in plain JAX: equal to the `xla` path (arguments as `dot_product_attention`), in
    O(b n (t + s) h) memory besides one `[block_q, block_k]` block of scores per head, forward and backward.

    The heads-first layouts are padded up to whole blocks here, outside the custom VJP, so that autodiff drops the
    padding's gradients; padded keys are masked, padded query rows are computed and cut off.
    """
    b, t, n, h = q_btnh.shape
    s, g = k_bsgh.shape[1], k_bsgh.shape[2]
    r = n // g
    if (causal or segment_ids_bt is not None) and t != s:
        raise ValueError(f"blockwise attention with causal or segment_ids_bt needs as many queries as keys, got "
                         f"{t} and {s}; pass mask_b1ts for queries against a cache")
    block_q, block_k = min(block_q, t), min(block_k, s)
    pad_t, pad_s = -t % block_q, -s % block_k
    q_bgrth = q_btnh.reshape(b, t, g, r, h).transpose(0, 2, 3, 1, 4)
    q_bgrth = jnp.pad(q_bgrth, ((0, 0), (0, 0), (0, 0), (0, pad_t), (0, 0)))
    k_bgsh, v_bgsh = (jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, pad_s), (0, 0))) for x in (k_bsgh, v_bsgh))
    if segment_ids_bt is not None:
        segment_ids_bt = jnp.pad(segment_ids_bt, ((0, 0), (0, max(pad_t, pad_s))))
    slopes_n = None if alibi_slopes_n is None else jnp.asarray(alibi_slopes_n, jnp.float32)
    blocks = _Blocks(block_q, block_k, causal, s)
    out_bgrth = _flash(q_bgrth, k_bgsh, v_bgsh, segment_ids_bt, slopes_n, jnp.asarray(query_offset, jnp.int32), blocks)
    return out_bgrth[:, :, :, :t].transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def _block_scores(blocks: _Blocks, q_bgrth, k_bgsh, segment_ids_bt, slopes_n, query_offset, q_start, k_start):
    """fp32 `[b, g, r, block_q, block_k]`: the scaled scores of the query block at row `q_start` against the key
    block at `k_start`, ALiBi added, masked pairs at `_MASKED`."""
    g, r, h = q_bgrth.shape[1], q_bgrth.shape[2], q_bgrth.shape[-1]
    q_block_bgrth = jax.lax.dynamic_slice_in_dim(q_bgrth, q_start, blocks.block_q, axis=3)
    k_block_bgsh = jax.lax.dynamic_slice_in_dim(k_bgsh, k_start, blocks.block_k, axis=2)
    scores_bgrts = jnp.einsum("bgrth,bgsh->bgrts", q_block_bgrth, k_block_bgsh,
                              preferred_element_type=jnp.float32) * (h ** -0.5)
    query_index_t = q_start + jnp.arange(blocks.block_q)
    key_index_s = k_start + jnp.arange(blocks.block_k)
    if slopes_n is not None:
        alibi_nts = alibi_bias(slopes_n, query_offset + query_index_t, key_index_s)
        scores_bgrts = scores_bgrts + alibi_nts.reshape(g, r, blocks.block_q, blocks.block_k)
    mask_b11ts = None
    if blocks.key_length < k_bgsh.shape[2]:
        mask_b11ts = (key_index_s < blocks.key_length)[None, None, None, None, :]
    if blocks.causal:
        mask_b11ts = _combine(mask_b11ts, (query_index_t[:, None] >= key_index_s[None, :])[None, None, None])
    if segment_ids_bt is not None:
        query_segment_bt = jax.lax.dynamic_slice_in_dim(segment_ids_bt, q_start, blocks.block_q, axis=1)
        key_segment_bs = jax.lax.dynamic_slice_in_dim(segment_ids_bt, k_start, blocks.block_k, axis=1)
        mask_b11ts = _combine(
            mask_b11ts, query_segment_bt[:, None, None, :, None] == key_segment_bs[:, None, None, None, :])
    return scores_bgrts if mask_b11ts is None else jnp.where(mask_b11ts, scores_bgrts, _MASKED)


def _key_blocks_of(blocks: _Blocks, i, num_key_blocks: int):
    """How many key blocks query block i attends: all, or causal, those starting at or before its last row."""
    if not blocks.causal:
        return num_key_blocks
    return jnp.minimum(num_key_blocks, ((i + 1) * blocks.block_q - 1) // blocks.block_k + 1)


def _first_query_block_of(blocks: _Blocks, j):
    """The first query block that attends key block j: 0, or causal, the one holding the row of its first key."""
    return (j * blocks.block_k) // blocks.block_q if blocks.causal else 0


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q_bgrth, k_bgsh, v_bgsh, segment_ids_bt, slopes_n, query_offset, blocks: _Blocks) -> jax.Array:
    """Attention on heads-first layouts padded to whole blocks: out `[b, g, r, t, h]` in the dtype of q."""
    return _flash_forward(q_bgrth, k_bgsh, v_bgsh, segment_ids_bt, slopes_n, query_offset, blocks)[0]


def _flash_forward(q_bgrth, k_bgsh, v_bgsh, segment_ids_bt, slopes_n, query_offset, blocks: _Blocks):
    """Out `[b, g, r, t, h]` and the fp32 logsumexp of each row's scores `[b, g, r, t]` (the backward's residual).

    Each query block runs an online softmax over its key blocks: a running max m, sum l of `exp(score - m)` and
    accumulator of `exp(score - m) v`, rescaled by `exp(m_old - m_new)` whenever the max grows.
    """
    t = q_bgrth.shape[3]
    num_key_blocks = k_bgsh.shape[2] // blocks.block_k
    score = functools.partial(_block_scores, blocks, q_bgrth, k_bgsh, segment_ids_bt, slopes_n, query_offset)

    def query_block(i, outputs):
        out_bgrth, lse_bgrt = outputs
        q_start = i * blocks.block_q

        def key_block(j, running):
            max_bgrt, sum_bgrt, acc_bgrth = running
            k_start = j * blocks.block_k
            scores_bgrts = score(q_start, k_start)
            new_max_bgrt = jnp.maximum(max_bgrt, jnp.max(scores_bgrts, axis=-1))
            rescale_bgrt = jnp.exp(max_bgrt - new_max_bgrt)
            probs_bgrts = jnp.exp(scores_bgrts - new_max_bgrt[..., None])
            v_block_bgsh = jax.lax.dynamic_slice_in_dim(v_bgsh, k_start, blocks.block_k, axis=2)
            acc_bgrth = acc_bgrth * rescale_bgrt[..., None] + jnp.einsum(
                "bgrts,bgsh->bgrth", probs_bgrts.astype(v_bgsh.dtype), v_block_bgsh, preferred_element_type=jnp.float32)
            return new_max_bgrt, sum_bgrt * rescale_bgrt + jnp.sum(probs_bgrts, axis=-1), acc_bgrth

        # The max starts at the masked score, not -inf: exp(max_old - max_new) is then never exp(-inf + inf), NaN.
        # Buffers are made `_like` slices of the inputs, so that they take the inputs' sharding on any mesh.
        row_bgrt = jnp.zeros_like(q_bgrth[:, :, :, :blocks.block_q, 0], jnp.float32)
        start = (row_bgrt + _MASKED, row_bgrt, jnp.zeros_like(q_bgrth[:, :, :, :blocks.block_q], jnp.float32))
        max_bgrt, sum_bgrt, acc_bgrth = jax.lax.fori_loop(
            0, _key_blocks_of(blocks, i, num_key_blocks), key_block, start)
        out_block_bgrth = (acc_bgrth / sum_bgrt[..., None]).astype(out_bgrth.dtype)
        out_bgrth = jax.lax.dynamic_update_slice_in_dim(out_bgrth, out_block_bgrth, q_start, axis=3)
        lse_bgrt = jax.lax.dynamic_update_slice_in_dim(lse_bgrt, max_bgrt + jnp.log(sum_bgrt), q_start, axis=3)
        return out_bgrth, lse_bgrt

    outputs = (jnp.zeros_like(q_bgrth), jnp.zeros_like(q_bgrth[..., 0], jnp.float32))
    return jax.lax.fori_loop(0, t // blocks.block_q, query_block, outputs)


def _flash_fwd(q_bgrth, k_bgsh, v_bgsh, segment_ids_bt, slopes_n, query_offset, blocks: _Blocks):
    out_bgrth, lse_bgrt = _flash_forward(q_bgrth, k_bgsh, v_bgsh, segment_ids_bt, slopes_n, query_offset, blocks)
    return out_bgrth, (q_bgrth, k_bgsh, v_bgsh, segment_ids_bt, slopes_n, query_offset, out_bgrth, lse_bgrt)


def _flash_bwd(blocks: _Blocks, residuals, dout_bgrth):
    """FlashAttention-2's backward: per key block, the query blocks that attend it recompute their probabilities
    `exp(score - lse)`; dk and dv of the key block accumulate over them, dq of each query block in a full buffer."""
    q_bgrth, k_bgsh, v_bgsh, segment_ids_bt, slopes_n, query_offset, out_bgrth, lse_bgrt = residuals
    h = q_bgrth.shape[-1]
    num_query_blocks, num_key_blocks = q_bgrth.shape[3] // blocks.block_q, k_bgsh.shape[2] // blocks.block_k
    score = functools.partial(_block_scores, blocks, q_bgrth, k_bgsh, segment_ids_bt, slopes_n, query_offset)
    # The softmax's backward `p * (dp - sum(p * dp))` with `sum(p * dp) = sum(dout * out)` per row.
    delta_bgrt = jnp.sum(dout_bgrth.astype(jnp.float32) * out_bgrth.astype(jnp.float32), axis=-1)
    query_rows = lambda x, i: jax.lax.dynamic_slice_in_dim(x, i * blocks.block_q, blocks.block_q, axis=3)

    def key_block(j, grads):
        dq_bgrth, dk_bgsh, dv_bgsh = grads
        k_start = j * blocks.block_k
        k_block_bgsh = jax.lax.dynamic_slice_in_dim(k_bgsh, k_start, blocks.block_k, axis=2)
        v_block_bgsh = jax.lax.dynamic_slice_in_dim(v_bgsh, k_start, blocks.block_k, axis=2)

        def query_block(i, block_grads):
            dq_bgrth, dk_block_bgsh, dv_block_bgsh = block_grads
            q_block_bgrth, dout_block_bgrth = query_rows(q_bgrth, i), query_rows(dout_bgrth, i)
            probs_bgrts = jnp.exp(score(i * blocks.block_q, k_start) - query_rows(lse_bgrt, i)[..., None])
            dv_block_bgsh += jnp.einsum("bgrts,bgrth->bgsh", probs_bgrts.astype(dout_bgrth.dtype), dout_block_bgrth,
                                        preferred_element_type=jnp.float32)
            dprobs_bgrts = jnp.einsum("bgrth,bgsh->bgrts", dout_block_bgrth, v_block_bgsh,
                                      preferred_element_type=jnp.float32)
            # The gradient of the scaled scores, times the scale: that of the raw products q.k.
            dscores_bgrts = probs_bgrts * (dprobs_bgrts - query_rows(delta_bgrt, i)[..., None]) * (h ** -0.5)
            dq_block_bgrth = query_rows(dq_bgrth, i) + jnp.einsum(
                "bgrts,bgsh->bgrth", dscores_bgrts.astype(k_bgsh.dtype), k_block_bgsh,
                preferred_element_type=jnp.float32)
            dq_bgrth = jax.lax.dynamic_update_slice_in_dim(dq_bgrth, dq_block_bgrth, i * blocks.block_q, axis=3)
            dk_block_bgsh += jnp.einsum("bgrts,bgrth->bgsh", dscores_bgrts.astype(q_bgrth.dtype), q_block_bgrth,
                                        preferred_element_type=jnp.float32)
            return dq_bgrth, dk_block_bgsh, dv_block_bgsh

        block_zeros = jnp.zeros_like(k_block_bgsh, jnp.float32)
        dq_bgrth, dk_block_bgsh, dv_block_bgsh = jax.lax.fori_loop(
            _first_query_block_of(blocks, j), num_query_blocks, query_block, (dq_bgrth, block_zeros, block_zeros))
        dk_bgsh = jax.lax.dynamic_update_slice_in_dim(dk_bgsh, dk_block_bgsh, k_start, axis=2)
        dv_bgsh = jax.lax.dynamic_update_slice_in_dim(dv_bgsh, dv_block_bgsh, k_start, axis=2)
        return dq_bgrth, dk_bgsh, dv_bgsh

    grads = tuple(jnp.zeros_like(x, jnp.float32) for x in (q_bgrth, k_bgsh, v_bgsh))
    dq_bgrth, dk_bgsh, dv_bgsh = jax.lax.fori_loop(0, num_key_blocks, key_block, grads)
    # Segment ids, slopes and the offset get no gradient (ids and offset are integers, the slopes fixed).
    return (dq_bgrth.astype(q_bgrth.dtype), dk_bgsh.astype(k_bgsh.dtype), dv_bgsh.astype(v_bgsh.dtype),
            None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


# --------------------------------------------------------------------------------------------------------------------
# TPU splash attention.


def splash_attention(
    q_btnh: jax.Array,
    k_bsgh: jax.Array,
    v_bsgh: jax.Array,
    *,
    segment_ids_bt: jax.Array | None = None,
    causal: bool = True,
    block_q: int = 512,
    block_k: int = 512,
    interpret: bool | None = None,
) -> jax.Array:
    """Splash attention (Pallas, TPU) per batch row: a `CausalMask` (or `FullMask`) for every head, `SegmentIds` for
    packed documents, key/value heads shared by their query heads inside the kernel.

    Lengths must be multiples of 128; blocks are the largest multiples of 128 up to `block_q` / `block_k` that divide
    them. `interpret`: Pallas interpret mode, by default wherever the backend is not a TPU (tests on a CPU).
    """
    # Imported here: the other implementations never load Pallas' TPU kernels.
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    t, n, h = q_btnh.shape[1:]
    s = k_bsgh.shape[1]
    if t % SPLASH_LANES or s % SPLASH_LANES:
        raise ConfigError(f"config.model.attention='splash' needs lengths that are multiples of {SPLASH_LANES}, got "
                          f"{t} queries and {s} keys; use 'blockwise' or 'xla'")
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    block_q, block_k = _splash_block(t, block_q), _splash_block(s, block_k)
    head_mask = splash.CausalMask((t, s)) if causal else splash.FullMask((t, s))
    kernel = splash.make_splash_mha(
        splash.MultiHeadMask([head_mask] * n), head_shards=1, q_seq_shards=1, interpret=interpret,
        block_sizes=splash.BlockSizes(
            block_q=block_q, block_kv=block_k, block_kv_compute=block_k, block_q_dkv=block_q, block_kv_dkv=block_k,
            block_kv_dkv_compute=block_k, block_q_dq=block_q, block_kv_dq=block_k))
    # The kernel does not scale the scores: scale the queries (as MaxText does).
    q_bnth = (q_btnh * jnp.asarray(h ** -0.5, q_btnh.dtype)).transpose(0, 2, 1, 3)
    k_bgsh, v_bgsh = k_bsgh.transpose(0, 2, 1, 3), v_bsgh.transpose(0, 2, 1, 3)
    if segment_ids_bt is None:
        out_bnth = jax.vmap(kernel)(q_bnth, k_bgsh, v_bgsh)
    else:
        segment_ids = splash.SegmentIds(q=segment_ids_bt, kv=segment_ids_bt)
        out_bnth = jax.vmap(kernel)(q_bnth, k_bgsh, v_bgsh, segment_ids)
    return out_bnth.transpose(0, 2, 1, 3)


def _splash_block(length: int, block: int) -> int:
    """The largest multiple of `SPLASH_LANES` that divides `length` (itself one) and is at most `block` (or 128)."""
    return max(c for c in range(SPLASH_LANES, max(block, SPLASH_LANES) + 1, SPLASH_LANES) if length % c == 0)


# --------------------------------------------------------------------------------------------------------------------
# Packed documents as runs (cuDNN's packed layout) instead of a [b, 1, t, t] mask.


def segment_runs(segment_ids_bt: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array]:
    """The runs of equal ids in each row, as cuDNN's packed layout takes packed documents.

    A row's documents are runs of equal `segment_ids_bt`; its trailing padding (id 0) is a run of its own, so every
    position is in exactly one run and attention within runs equals attention within equal ids everywhere.

    Returns:
      `lengths_bm`: int32 `[b, M]`, the length of each run, -1 after a row's last run.
      `offsets_bm1`: int32 `[b, M + 1]`, the first position of each run, -1 after a row's last run.
      M = `max_segments`; a row with more runs than M loses its last runs (`check_segment_runs` rules that out).
    """
    b, t = segment_ids_bt.shape
    starts_bt = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids_bt[:, 1:] != segment_ids_bt[:, :-1]], axis=1)
    first_positions = lambda starts_t: jnp.nonzero(starts_t, size=max_segments + 1, fill_value=-1)[0]
    offsets_bm1 = jax.vmap(first_positions)(starts_bt).astype(jnp.int32)
    ends_bm = jnp.where(offsets_bm1[:, 1:] >= 0, offsets_bm1[:, 1:], t)
    lengths_bm = jnp.where(offsets_bm1[:, :-1] >= 0, ends_bm - offsets_bm1[:, :-1], -1)
    return lengths_bm, offsets_bm1


def runs_mask(lengths_bm: jax.Array, offsets_bm1: jax.Array, length: int, causal: bool) -> jax.Array:
    """Boolean `[b, 1, t, t]`: True where query t and key s lie in the same run (and s <= t if causal). The XLA
    reading of `segment_runs`' output: what cuDNN computes from the same lengths and offsets, testable on a CPU."""
    position_t = jnp.arange(length)
    starts_bm = offsets_bm1[:, :-1]
    in_run_btm = ((position_t[None, :, None] >= starts_bm[:, None, :])
                  & (position_t[None, :, None] < (starts_bm + lengths_bm)[:, None, :]) & (lengths_bm[:, None, :] > 0))
    run_bt = jnp.where(jnp.any(in_run_btm, axis=-1), jnp.argmax(in_run_btm, axis=-1), -1)
    mask_bts = (run_bt[:, :, None] == run_bt[:, None, :]) & (run_bt[:, :, None] >= 0)
    if causal:
        mask_bts = mask_bts & (position_t[:, None] >= position_t[None, :])
    return mask_bts[:, None]


def count_segment_runs(segment_ids_bt: np.ndarray) -> int:
    """The most runs of equal ids in any row of a host batch (what `segment_runs` needs M to cover)."""
    segment_ids_bt = np.asarray(segment_ids_bt)
    return int(1 + np.max(np.sum(segment_ids_bt[:, 1:] != segment_ids_bt[:, :-1], axis=1), initial=0))


def check_segment_runs(segment_ids_bt: np.ndarray, max_segments: int) -> None:
    """Raises `DataError` when `config.model.attention_max_segments` (above 0) is too small for a host batch."""
    if max_segments > 0 and (runs := count_segment_runs(segment_ids_bt)) > max_segments:
        raise DataError(f"a batch row packs {runs} segments (documents, and padding as one more), more than "
                        f"config.model.attention_max_segments={max_segments}; raise it, or set 0 for the mask")


def _cudnn_packed_attention(q_btnh, k_bsgh, v_bsgh, segment_ids_bt, causal: bool, max_segments: int):
    """cuDNN's flash attention on the packed layout, or None (with a warning, once) where JAX or cuDNN lack it."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

        # At least 2: JAX turns per-row offsets into cuDNN's global ones only for M > 1. The starts-only offsets
        # (no end entry) are what that conversion expects: it appends the end of the batch after the last start,
        # which ends every row's last run because the runs tile each row (padding is a run).
        lengths_bm, offsets_bm1 = segment_runs(segment_ids_bt, max(max_segments, 2))
        mask_type = cudnn_attention.MaskType.PADDING_CAUSAL if causal else cudnn_attention.MaskType.PADDING
        return cudnn_attention.dot_product_attention(
            q_btnh, k_bsgh, v_bsgh, q_seqlen=lengths_bm, kv_seqlen=lengths_bm, q_offsets=offsets_bm1,
            kv_offsets=offsets_bm1, scale=q_btnh.shape[-1] ** -0.5, mask_type=mask_type, qkv_layout="BTNH")
    except (ImportError, AttributeError, NotImplementedError, RuntimeError, ValueError, TypeError) as error:
        _warn_once(f"cuDNN attention on packed offsets is unavailable ({type(error).__name__}: "
                   f"{' '.join(str(error).split())[:160]}); using a [b, 1, t, t] mask instead")
        return None


@functools.cache
def _warn_once(message: str) -> None:
    logging.warning(message)
