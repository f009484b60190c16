"""Attention implementations behind one function, chosen by `config.model.attention`.

Axis letters (the package legend, `lm/__init__.py`): b batch, t query positions, s key/value positions, n query
heads, g key/value heads (groups), r = n // g query heads per key/value head, h head dimension.

- `xla`: the reference. Grouped-query einsums that never repeat K/V heads in memory, fp32 scores and softmax;
  causal self-attention runs by query blocks, each against the keys up to its last row only (no work on the masked
  upper triangle of blocks). Works on every backend and is what CPU tests run.
- `cudnn`: `jax.nn.dot_product_attention(implementation='cudnn')`, the fused flash-attention kernel of cuDNN on NVIDIA
  GPUs (bf16/fp16 inputs only). Packed documents become a boolean mask, which cuDNN takes as a bias, unless
  `max_segments` (`config.model.attention_max_segments`) is set: then cuDNN gets each row's documents as the lengths
  and offsets of at most that many runs (`segment_runs`; no `[b, 1, t, t]` array at all), falling back to the mask
  with a warning where JAX or cuDNN lack the packed layout.
- `auto`: `cudnn` on GPU for half-precision inputs, `xla` otherwise.

TPU kernels plug in here: a `splash` case would call
`jax.experimental.pallas.ops.tpu.splash_attention` with a `CausalMask` and `segment_ids`
(`SegmentIds(q=segment_ids_bt, kv=segment_ids_bt)`) under `shard_map` over the batch and head axes, as MaxText does;
its signature is the same as the two cases below.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from lm.errors import DataError

IMPLEMENTATIONS = ("auto", "xla", "cudnn")
MIN_QUERY_BLOCK = 64  # Rows of the smallest query block of the XLA path's causal split (`causal_query_blocks`).


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


def cache_attention_mask(start_b: jax.Array, first_slot: jax.Array, query_length: int, cache_length: int) -> jax.Array:
    """Boolean mask `[b, 1, t, s]` for queries written to cache slots `first_slot + [0, t)` against all `s` slots.

    Query slot q may attend key slot s when `start_b <= s <= q`: causal, and never the left padding before a row's
    first real token (`start_b`), nor the slots not yet written (s > q).
    """
    slot_s = jnp.arange(cache_length)
    query_slot_t = first_slot + jnp.arange(query_length)
    causal_ts = slot_s[None, :] <= query_slot_t[:, None]
    not_padding_bs = slot_s[None, :] >= start_b[:, None]
    return (causal_ts[None] & not_padding_bs[:, None, :])[:, None]


def _xla_attention(q_btnh, k_bsgh, v_bsgh, mask_b1ts) -> jax.Array:
    b, t, n, h = q_btnh.shape
    s, g = k_bsgh.shape[1], k_bsgh.shape[2]
    r = n // g
    # Heads-first layouts, each group's r query heads stacked along the query axis (q = r * t): both products are then
    # plain batched matmuls, batch axes (b, g) first and the contracted axis last. On the [b, t, g, r, h] layout
    # XLA:CPU transposes the scores around every dot of the backward pass (forward and backward 1.4x slower).
    q_bgqh = q_btnh.reshape(b, t, g, r, h).transpose(0, 2, 3, 1, 4).reshape(b, g, r * t, h)
    k_bgsh, v_bgsh = k_bsgh.transpose(0, 2, 1, 3), v_bsgh.transpose(0, 2, 1, 3)
    scores_bgqs = jnp.einsum("bgqh,bgsh->bgqs", q_bgqh, k_bgsh, preferred_element_type=jnp.float32) * (h ** -0.5)
    if mask_b1ts is not None:
        # [b, 1, t, s] -> [b, 1, 1, t, s] broadcasts over (g, r). A large finite negative keeps fully masked rows
        # (never produced by a causal mask, which always allows the diagonal) free of NaN.
        scores_bgrts = jnp.where(mask_b1ts[:, :, None], scores_bgqs.reshape(b, g, r, t, s), jnp.finfo(jnp.float32).min)
        scores_bgqs = scores_bgrts.reshape(b, g, r * t, s)
    probs_bgqs = jax.nn.softmax(scores_bgqs, axis=-1).astype(v_bsgh.dtype)
    out_bgqh = jnp.einsum("bgqs,bgsh->bgqh", probs_bgqs, v_bgsh, preferred_element_type=jnp.float32)
    out_btnh = out_bgqh.reshape(b, g, r, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
    return out_btnh.astype(q_btnh.dtype)


def dot_product_attention(
    q_btnh: jax.Array,
    k_bsgh: jax.Array,
    v_bsgh: jax.Array,
    *,
    segment_ids_bt: jax.Array | None = None,
    causal: bool = True,
    mask_b1ts: jax.Array | None = None,
    implementation: str = "xla",
    max_segments: int = 0,
) -> jax.Array:
    """Multi-head / grouped-query / multi-query attention.

    Args:
      q_btnh: queries `[batch, length, heads, head_dim]`.
      k_bsgh, v_bsgh: keys and values `[batch, length, kv_heads, head_dim]`; `heads % kv_heads == 0`.
      segment_ids_bt: int `[batch, length]` document ids of packed rows; tokens attend only within their segment.
      causal: mask future keys (query and key positions aligned, t == s).
      mask_b1ts: an explicit boolean mask `[batch, 1, length, kv_length]` (decoding against a KV cache, where
        t != s; see `cache_attention_mask`), combined with the others.
      implementation: `xla`, `cudnn` or `auto` (see module docstring).
      max_segments: cuDNN with `segment_ids_bt`: above 0, pass the packed documents to cuDNN as the lengths and
        offsets of at most this many runs of equal ids per row (`segment_runs`) instead of a `[b, 1, t, t]` mask;
        the caller guarantees the bound (`check_segment_runs`). 0: the mask.

    Returns:
      `[batch, length, heads, head_dim]` in the dtype of `q_btnh`.
    """
    implementation = resolve_implementation(implementation, q_btnh.dtype)
    if implementation == "cudnn":
        if segment_ids_bt is not None and max_segments > 0 and mask_b1ts is None:
            out_btnh = _cudnn_packed_attention(q_btnh, k_bsgh, v_bsgh, segment_ids_bt, causal, max_segments)
            if out_btnh is not None:
                return out_btnh
        mask = _combine(attention_mask(segment_ids_bt, q_btnh.shape[1], causal=False), mask_b1ts)
        return jax.nn.dot_product_attention(
            q_btnh, k_bsgh, v_bsgh, mask=mask, is_causal=causal, implementation="cudnn")
    if causal and q_btnh.shape[1] == k_bsgh.shape[1]:
        return _xla_causal_attention(q_btnh, k_bsgh, v_bsgh, segment_ids_bt, mask_b1ts)
    mask = _combine(attention_mask(segment_ids_bt, q_btnh.shape[1], causal), mask_b1ts)
    return _xla_attention(q_btnh, k_bsgh, v_bsgh, mask)


def causal_query_blocks(length: int) -> int:
    """How many query blocks `_xla_causal_attention` splits a length into: the most of 8, 4, 2 that divide it into
    blocks of at least `MIN_QUERY_BLOCK` rows (smaller blocks cost more in per-dot overhead than they save), else 1."""
    return next((k for k in (8, 4, 2) if length % k == 0 and length // k >= MIN_QUERY_BLOCK), 1)


def _xla_causal_attention(q_btnh, k_bsgh, v_bsgh, segment_ids_bt, mask_b1ts) -> jax.Array:
    """Causal self-attention (t == s) by query blocks: block i, rows `[i c, (i + 1) c)`, against keys `[0, (i + 1) c)`
    only, since every later key is masked for it. With k blocks that skips (k - 1) / 2k of the scores, softmax and
    both products (37.5% at k = 4; 8% of the whole train step of the CPU benchmark, `lm.bench.peer`); each block is
    exact (the same softmax over the same unmasked keys), so the result equals `_xla_attention` with the full mask.
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
        out_blocks.append(_xla_attention(q_btnh[:, start:stop], k_bsgh[:, :stop], v_bsgh[:, :stop], block_mask))
    return jnp.concatenate(out_blocks, axis=1)


def _combine(mask_a, mask_b):
    if mask_a is None or mask_b is None:
        return mask_b if mask_a is None else mask_a
    return mask_a & mask_b


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
