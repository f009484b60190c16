"""Blockwise cross-entropy: the LM head and the loss, computed together over vocabulary chunks.

`cross_entropy(hidden, kernel, targets, ...)` computes `softmax_cross_entropy(hidden @ kernel, targets)` without a
`[tokens, vocab]` array ever existing, forward or backward. A 256k vocabulary with 8k tokens would need 8.4 GB for
the fp32 logits alone; here the largest temporaries are a few `[tokens, chunk]` blocks, whatever the vocabulary.

Algorithm
---------
The vocabulary is cut into `n = ceil(V / chunk_size)` column blocks of (almost) equal width `C <= chunk_size`: a
"head" block of `V - (n - 1) * C` columns (1 <= head <= C), then `n - 1` blocks of `C` (`chunk_plan`). Every block
has a static width and a start of at most `V - C`, so `lax.dynamic_slice` never clamps (no column is read twice or
skipped), nothing is masked, and the kernel is never padded or copied. `V = 50257, chunk_size = 4096`: 13 blocks,
one of 3865 columns and twelve of 3866. `chunk_size >= V` is one block.
`token_log_probs` (per-token log p(target)) and `token_entropies` (per-token entropy, a metric) fold the same blocks.

1. Statistics pass (the forward): for each block, `logits_xc = hidden_xd @ kernel_dc` (matmul in the input dtype,
   fp32 accumulation), then in fp32 the online logsumexp (running max `m` and sum of `exp(logits - m)`, the sum
   rescaled when the max grows), the target logit (one element per row taken from the block that holds it) and, with
   label smoothing, the sum of the logits. The head block runs first, the middle blocks in a `lax.scan`, the last
   block last. The token accuracy falls out of the running max: the target is the argmax iff its logit equals it.
2. Gradient pass (only under differentiation): with the final log-partition `lse_x` known, each block's logits are
   formed again and turned into `dlogits_xc` (fp32, cast once to the matmul dtype), which feed
   `dhidden_xd += dlogits_xc @ kernel_dc.T` (accumulated in fp32 across blocks) and
   `dkernel[:, block] = hidden_xd.T @ dlogits_xc` (one fp32-accumulated matmul per block, written once, in place, into
   a kernel-shaped buffer of the kernel dtype; no kernel-sized fp32 accumulator is needed because no block of
   `dkernel` is ever accumulated).

Where the gradient is computed: in the forward rule
--------------------------------------------------
`jax.custom_vjp` allows two designs: the backward recomputes every block from `hidden`, `kernel` and the saved
log-partition, or the forward rule computes the gradients and saves only them as residuals. We do the latter.
Neither avoids computing the logits twice: an exact `dkernel` block needs every row's final normaliser `exp(-lse_x)`
(a per-row factor that cannot be pulled out of `hidden.T @ probs`), so each block's logits are needed once before
`lse` is known and once after; only storing them, `[N, V]`, would avoid that. (`dhidden` alone could be streamed with
flash-attention-style rescaling, but that moves a matmul rather than saving one.) What the forward rule does save:
the last block of the statistics pass is still in hand when the gradient pass starts, so it is not recomputed. The
cost is `3 + (n - 1) / n` matmuls of the naive `[N, D] x [D, V]` size instead of 4, and exactly the naive's 3 when one
block covers the vocabulary. The backward rule only scales the saved gradients (`[N, D]` fp32, kernel-shaped in the
kernel dtype, `[N]` for the weights) by the incoming cotangent; nothing else crosses the forward/backward boundary.
The primal (evaluation) path runs the statistics pass alone. The price: under `jax.checkpoint` the forward rule is
replayed in the backward pass, so keep the loss outside rematerialised regions (the model remats its layers, not the
loss after them).

Numerics
--------
Matmuls run in `hidden.dtype` (the model's compute dtype; a kernel of another dtype is cast block by block, as Flax's
`Dense(dtype=...)` does) with `preferred_element_type=float32`. The softmax statistics, `dlogits` and the `dhidden`
accumulator are fp32: `probs - onehot` is formed in fp32 from fp32 logits, so confident predictions (p -> 1) keep
their small gradients in bf16. Each column block of `dkernel` is a single matmul with fp32 accumulation, cast to the
kernel dtype once.

Sharding
--------
Everything works under `jax.jit` with sharded inputs (hidden over the batch axes, kernel over `vocab` or `embed`) and
gives the single-device results. With the kernel sharded over `vocab`, the compiler gathers each block it slices, so
a tensor-parallel vocabulary trades communication for memory here (a shard_map version that keeps blocks local and
all-reduces the `[N]` statistics would avoid it).

Names follow the package's axis legend (`lm/__init__.py`): x the N tokens (the leading axes of `hidden` flattened),
d the model width, v the vocabulary, c the columns of one block.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["cross_entropy", "token_log_probs", "token_entropies", "chunk_plan"]

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class _Options:
    """Static (hashable) settings of one cross-entropy call."""

    chunk_size: int
    z_loss: float
    label_smoothing: float
    logit_softcap: float | None


class _Stats(NamedTuple):
    """Per-token running statistics of the statistics pass, all `[N]`."""

    max_x: jax.Array  # fp32 running max of the logits seen so far.
    sumexp_x: jax.Array  # fp32 sum of exp(logits - max_x) over the columns seen so far.
    target_logit_x: jax.Array  # fp32 logit of the target column (0 until its block is seen).
    logit_sum_x: jax.Array  # fp32 sum of all logits (only used with label smoothing).


class _EntropyStats(NamedTuple):
    """Per-token running statistics of `token_entropies`, all `[N]` fp32."""

    max_x: jax.Array  # running max m of the logits seen so far.
    sumexp_x: jax.Array  # s = sum of exp(z - m) over the columns seen so far.
    centred_x: jax.Array  # w = sum of exp(z - m) * (z - m) over the columns seen so far.


def chunk_plan(vocab_size: int, chunk_size: int) -> tuple[int, int, int]:
    """How the vocabulary is cut into blocks: `(num_blocks, width, head_width)`.

    `num_blocks = ceil(V / chunk_size)` blocks: first a head block of `head_width` columns (1 <= head_width <= width),
    then `num_blocks - 1` blocks of `width = ceil(V / num_blocks) <= chunk_size` columns. Widths are balanced so no
    block is a sliver, and since `(num_blocks - 1) * width < V` every block lies inside `[0, V)`.
    """
    num_blocks = -(-vocab_size // chunk_size)
    width = -(-vocab_size // num_blocks)
    head_width = vocab_size - (num_blocks - 1) * width
    return num_blocks, width, head_width


def cross_entropy(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, weights: jax.Array | None = None, *,
                  chunk_size: int, z_loss: float = 0.0, label_smoothing: float = 0.0,
                  logit_softcap: float | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted mean cross-entropy of `hidden @ kernel` against `targets`, computed blockwise over the vocabulary.

    Args:
      hidden: `[..., d]` final hidden states (bf16 or fp32); its dtype is the matmul dtype.
      kernel: `[d, V]` LM-head kernel (any float dtype; cast to `hidden.dtype` one block at a time).
      targets: `[...]` integer next-token ids in `[0, V)`. Tokens with weight 0 may hold any value (e.g. padding).
      weights: optional `[...]` non-negative float weights; 0 ignores a token. None: every token has weight 1.
      chunk_size: most vocabulary columns per block; temporaries grow with it (about `4 * tokens * chunk_size`
        bytes per fp32 block array), the number of sequential steps shrinks with it.
      z_loss: PaLM's auxiliary `z_loss * logsumexp(logits)^2` per token, added to the loss.
      label_smoothing: eps; the target distribution is `(1 - eps) * onehot(target) + eps / V` (optax.smooth_labels).
      logit_softcap: c; if set, logits are `c * tanh(raw / c)` before everything else (softmax, z-loss, accuracy).

    Returns:
      `(loss, aux)`: `loss` is the fp32 scalar `sum(w * (ce + z_loss * lse^2)) / sum(w)`, 0 when `sum(w) == 0` (then
      all gradients are 0 as well). `aux` holds fp32 scalars, weighted means over the counted tokens unless noted:
      `nll` (unsmoothed -log p(target): log-perplexity), `z_loss` (the z-loss term), `log_z` (log-partition `lse`),
      `accuracy` (argmax == target; a tie for the max counts as correct), `weight_sum` (sum of weights, a sum).
      `aux` carries no gradient.

    Gradients flow to `hidden`, `kernel` and `weights` (exact, including z-loss, smoothing and soft-cap terms), not to
    `targets`.
    """
    hidden, kernel, targets = jnp.asarray(hidden), jnp.asarray(kernel), jnp.asarray(targets)
    if hidden.ndim < 1 or kernel.ndim != 2 or kernel.shape[0] != hidden.shape[-1]:
        raise ValueError(f"cross_entropy: expected hidden [..., d] and kernel [d, V] with the same d, got hidden "
                         f"{hidden.shape} and kernel {kernel.shape}")
    if not (jnp.issubdtype(hidden.dtype, jnp.floating) and jnp.issubdtype(kernel.dtype, jnp.floating)):
        raise ValueError(f"cross_entropy: hidden and kernel must be floating point, got {hidden.dtype} and "
                         f"{kernel.dtype}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"cross_entropy: targets must have shape hidden.shape[:-1]={hidden.shape[:-1]}, got "
                         f"{targets.shape}")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"cross_entropy: targets must be integers, got {targets.dtype}")
    if weights is not None:
        weights = jnp.asarray(weights)
        if weights.shape != targets.shape:
            raise ValueError(f"cross_entropy: weights must have the shape of targets {targets.shape}, got "
                             f"{weights.shape}")
    if not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise ValueError(f"cross_entropy: chunk_size must be a positive integer, got {chunk_size!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1), got {label_smoothing!r}")
    if logit_softcap is not None and not logit_softcap > 0:
        raise ValueError(f"cross_entropy: logit_softcap must be None or positive, got {logit_softcap!r}")

    d = hidden.shape[-1]
    hidden_xd = hidden.reshape(-1, d)
    targets_x = targets.reshape(-1).astype(jnp.int32)
    if weights is None:
        weights_x = jnp.ones(targets_x.shape, _F32)
    else:
        weights_x = weights.reshape(-1).astype(_F32)
    options = _Options(int(chunk_size), float(z_loss), float(label_smoothing),
                       None if logit_softcap is None else float(logit_softcap))
    loss, metrics = _blockwise_cross_entropy(hidden_xd, kernel, targets_x, weights_x, options)
    return loss, {name: lax.stop_gradient(value) for name, value in metrics.items()}


def token_log_probs(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, *, chunk_size: int,
                    logit_softcap: float | None = None) -> tuple[jax.Array, jax.Array]:
    """Per-token `log p(target)` of `hidden @ kernel` and whether the target is the argmax, blockwise like
    `cross_entropy` (its statistics pass alone: the `[tokens, vocab]` logits are never formed).

    Args:
      hidden: `[..., d]` final hidden states; kernel: `[d, V]` LM head; targets: `[...]` integer ids in `[0, V)`.
      chunk_size, logit_softcap: as in `cross_entropy`.

    Returns:
      `(log_prob, is_argmax)`, both `[...]`: fp32 `target_logit - logsumexp(logits)` and bool `target_logit ==
      max(logits)` (a tie for the max counts as the argmax, where `argmax` would pick the lowest tied column).

    Differentiable in `hidden` and `kernel` (sequence log-probabilities of preference objectives): the backward pass
    forms each block's logits again, as `cross_entropy`'s gradient pass does.
    """
    hidden, kernel, targets = jnp.asarray(hidden), jnp.asarray(kernel), jnp.asarray(targets)
    if kernel.ndim != 2 or hidden.shape[-1] != kernel.shape[0] or targets.shape != hidden.shape[:-1]:
        raise ValueError(f"token_log_probs: expected hidden [..., d], kernel [d, V] and targets [...] of "
                         f"hidden.shape[:-1], got {hidden.shape}, {kernel.shape} and {targets.shape}")
    options = _Options(int(chunk_size), 0.0, 0.0, None if logit_softcap is None else float(logit_softcap))
    log_prob_x, is_argmax_x = _blockwise_log_probs(hidden.reshape(-1, hidden.shape[-1]), kernel,
                                                   targets.reshape(-1).astype(jnp.int32), options)
    return log_prob_x.reshape(targets.shape), is_argmax_x.reshape(targets.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blockwise_log_probs(hidden_xd, kernel_dv, targets_x, options):
    stats, _ = _statistics_pass(hidden_xd, kernel_dv, targets_x, options)
    return stats.target_logit_x - (stats.max_x + jnp.log(stats.sumexp_x)), stats.target_logit_x >= stats.max_x


def _blockwise_log_probs_fwd(hidden_xd, kernel_dv, targets_x, options):
    # Unlike the loss, the per-token cotangents are only known in the backward pass, so the gradient pass runs there,
    # from the saved log-partition and the last block's logits (`[N, C]`, never `[N, V]`).
    stats, last_logits_xc = _statistics_pass(hidden_xd, kernel_dv, targets_x, options)
    lse_x = stats.max_x + jnp.log(stats.sumexp_x)
    outputs = (stats.target_logit_x - lse_x, stats.target_logit_x >= stats.max_x)
    return outputs, (hidden_xd, kernel_dv, targets_x, lse_x, last_logits_xc)


def _blockwise_log_probs_bwd(options, residuals, cotangents):
    hidden_xd, kernel_dv, targets_x, lse_x, last_logits_xc = residuals
    # log p = -ce, so the gradient of sum_x g_x log p_x is the cross-entropy gradient scaled by -g_x.
    dhidden_xd, dkernel_dv = _gradient_pass(hidden_xd, kernel_dv, targets_x, -cotangents[0].astype(_F32), lse_x,
                                            last_logits_xc, options)
    return dhidden_xd.astype(hidden_xd.dtype), dkernel_dv, np.zeros(targets_x.shape, dtype=jax.dtypes.float0)


_blockwise_log_probs.defvjp(_blockwise_log_probs_fwd, _blockwise_log_probs_bwd)


def token_entropies(hidden: jax.Array, kernel: jax.Array, *, chunk_size: int,
                    logit_softcap: float | None = None) -> jax.Array:
    """Per-token entropy of `softmax(hidden @ kernel)`, blockwise like `cross_entropy` (no `[tokens, vocab]` array).

    `H = logsumexp(z) - sum_v softmax(z)_v z_v`, in nats. One pass over the blocks keeps, per token, the running max
    `m`, `s = sum exp(z - m)` and `w = sum exp(z - m) (z - m)`, both rescaled when `m` grows; then `H = log s - w / s`
    (logits centred on their max, so no large `lse` and `E[z]` cancel).

    Args:
      hidden: `[..., d]` final hidden states; kernel: `[d, V]` LM head.
      chunk_size, logit_softcap: as in `cross_entropy`.

    Returns:
      fp32 `[...]` (`hidden.shape[:-1]`) entropies. A metric: no gradient flows (inputs are stop-gradient'ed, so
      differentiating the caller never stores per-block residuals, which together would be `[tokens, vocab]`).
    """
    hidden, kernel = jnp.asarray(hidden), jnp.asarray(kernel)
    if hidden.ndim < 1 or kernel.ndim != 2 or hidden.shape[-1] != kernel.shape[0]:
        raise ValueError(f"token_entropies: expected hidden [..., d] and kernel [d, V] with the same d, got "
                         f"{hidden.shape} and {kernel.shape}")
    if not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise ValueError(f"token_entropies: chunk_size must be a positive integer, got {chunk_size!r}")
    options = _Options(int(chunk_size), 0.0, 0.0, None if logit_softcap is None else float(logit_softcap))
    hidden_xd = lax.stop_gradient(hidden.reshape(-1, hidden.shape[-1]))
    n = hidden_xd.shape[0]
    init = _EntropyStats(max_x=jnp.full((n,), -jnp.inf, _F32), sumexp_x=jnp.zeros((n,), _F32),
                         centred_x=jnp.zeros((n,), _F32))
    stats, _ = _fold_blocks(hidden_xd, lax.stop_gradient(kernel), options, init, _update_entropy_stats)
    return (jnp.log(stats.sumexp_x) - stats.centred_x / stats.sumexp_x).reshape(hidden.shape[:-1])


def _update_entropy_stats(stats: _EntropyStats, logits_xc, start) -> _EntropyStats:
    """Folds one block of logits into `token_entropies`' running statistics (the columns' position is irrelevant)."""
    del start
    max_x = jnp.maximum(stats.max_x, jnp.max(logits_xc, axis=1))
    # Re-centring the old sums on the new max m': exp(z - m') = a exp(z - m) with a = exp(m - m'), and
    # (z - m') = (z - m) + (m - m'), so s' = a s and w' = a (w + (m - m') s). Before the first block m = -inf and
    # s = w = 0: the shift is set to 0 there, since -inf * 0 would be NaN.
    shift_x = jnp.where(jnp.isfinite(stats.max_x), stats.max_x - max_x, 0.0)
    scale_x = jnp.exp(shift_x)
    centred_xc = logits_xc - max_x[:, None]
    exp_xc = jnp.exp(centred_xc)
    sumexp_x = scale_x * stats.sumexp_x + jnp.sum(exp_xc, axis=1)
    centred_x = scale_x * (stats.centred_x + shift_x * stats.sumexp_x) + jnp.sum(exp_xc * centred_xc, axis=1)
    return _EntropyStats(max_x, sumexp_x, centred_x)


# --------------------------------------------------------------------------------------------------------------------
# The custom-VJP core on flat [N, d] inputs.


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blockwise_cross_entropy(hidden_xd, kernel_dv, targets_x, weights_x, options):
    stats, _ = _statistics_pass(hidden_xd, kernel_dv, targets_x, options)
    loss, metrics, _, _, _ = _finish(stats, weights_x, kernel_dv.shape[1], options)
    return loss, metrics


def _blockwise_cross_entropy_fwd(hidden_xd, kernel_dv, targets_x, weights_x, options):
    stats, last_logits_xc = _statistics_pass(hidden_xd, kernel_dv, targets_x, options)
    loss, metrics, lse_x, ce_x, denominator = _finish(stats, weights_x, kernel_dv.shape[1], options)
    dhidden_xd, dkernel_dv = _gradient_pass(hidden_xd, kernel_dv, targets_x, weights_x / denominator, lse_x,
                                            last_logits_xc, options)
    # d/dw_x of sum(w * ce) / sum(w) = (ce_x - loss) / sum(w); with all weights 0 the loss is 0 and the denominator 1.
    dweights_x = (ce_x - loss) / denominator
    # dhidden stays fp32 until the cotangent is applied; the empty array only records hidden's dtype (residuals must
    # be arrays).
    return (loss, metrics), (dhidden_xd, dkernel_dv, dweights_x, jnp.zeros((0,), hidden_xd.dtype))


def _blockwise_cross_entropy_bwd(options, residuals, cotangents):
    del options
    dhidden_xd, dkernel_dv, dweights_x, hidden_dtype_marker = residuals
    g = cotangents[0]  # The metrics carry no gradient; their cotangents are dropped.
    dhidden_xd = (g * dhidden_xd).astype(hidden_dtype_marker.dtype)
    # Scale in the kernel dtype: an fp32 product would be a kernel-sized fp32 temporary when the kernel is bf16.
    dkernel_dv = dkernel_dv * g.astype(dkernel_dv.dtype)
    dtargets_x = np.zeros(dweights_x.shape, dtype=jax.dtypes.float0)
    return dhidden_xd, dkernel_dv, dtargets_x, g * dweights_x


_blockwise_cross_entropy.defvjp(_blockwise_cross_entropy_fwd, _blockwise_cross_entropy_bwd)


# --------------------------------------------------------------------------------------------------------------------
# The two passes.


def _bits(x):
    """On CPU, a 16-bit float array viewed as uint16; otherwise (and for other dtypes) the array unchanged.

    XLA:CPU has no bf16 dynamic-slice / dynamic-update-slice: it rewrites them in fp32, hoists an fp32 copy of the
    whole kernel out of the loop (2.4 GB at d=2304, V=256k) and converts the whole dkernel buffer on every block
    write (time quadratic in V). Slicing and writing the uint16 bits avoids both; the price is one uint16 copy of the
    kernel, since XLA:CPU materialises the bitcast. GPUs and TPUs slice bf16 natively, so they keep the plain path.
    """
    if x.dtype.itemsize == 2 and jnp.issubdtype(x.dtype, jnp.floating) and jax.default_backend() == "cpu":
        return lax.bitcast_convert_type(x, jnp.uint16)
    return x


def _from_bits(x, dtype):
    """Inverse of `_bits`."""
    return lax.bitcast_convert_type(x, dtype) if x.dtype != dtype else x


def _block_logits(hidden_xd, kernel_dc, options):
    """`[N, C]` fp32 logits of one block (soft-capped if asked): matmul in hidden's dtype, fp32 accumulation."""
    logits_xc = lax.dot_general(hidden_xd, kernel_dc.astype(hidden_xd.dtype), (((1,), (0,)), ((), ())),
                                preferred_element_type=_F32)
    if options.logit_softcap is not None:
        logits_xc = options.logit_softcap * jnp.tanh(logits_xc / options.logit_softcap)
    return logits_xc


def _update_stats(stats: _Stats, logits_xc, start, targets_x) -> _Stats:
    """Folds one block of logits (columns `start .. start + C - 1`) into the running statistics."""
    block_max_x = jnp.max(logits_xc, axis=1)
    max_x = jnp.maximum(stats.max_x, block_max_x)
    # Online logsumexp: rescale the old sum to the new max (exp(-inf) = 0 on the first block).
    sumexp_x = (stats.sumexp_x * jnp.exp(stats.max_x - max_x)
                + jnp.sum(jnp.exp(logits_xc - max_x[:, None]), axis=1))
    # The target logit, if in this block: pick one element per row (a gather of N values, not a select over the
    # block), bitwise the logit that entered the max and the logsumexp.
    local_x = targets_x - start
    in_block_x = (local_x >= 0) & (local_x < logits_xc.shape[1])
    picked_x = jnp.take_along_axis(logits_xc, jnp.clip(local_x, 0, logits_xc.shape[1] - 1)[:, None], axis=1)[:, 0]
    target_logit_x = jnp.where(in_block_x, picked_x, stats.target_logit_x)
    logit_sum_x = stats.logit_sum_x + jnp.sum(logits_xc, axis=1)  # Dead code (removed) without label smoothing.
    return _Stats(max_x, sumexp_x, target_logit_x, logit_sum_x)


def _fold_blocks(hidden_xd, kernel_dv, options, state, update):
    """Folds every vocabulary block into `state` with `update(state, logits_xc, start)`, in the blocks' order: the
    head block, the middle blocks in a `lax.scan`, the last block. Returns the final state and the `[N, C]` logits of
    the last block processed."""
    vocab = kernel_dv.shape[1]
    num_blocks, width, head_width = chunk_plan(vocab, options.chunk_size)
    kernel_bits_dv = _bits(kernel_dv)

    def kernel_block(start, size):
        return _from_bits(lax.dynamic_slice_in_dim(kernel_bits_dv, start, size, axis=1), kernel_dv.dtype)

    # Head block [0, head_width).
    logits_xc = _block_logits(hidden_xd, kernel_block(0, head_width), options)
    state = update(state, logits_xc, 0)

    # Middle blocks: start = head_width + i * width for i < num_blocks - 2; never clamped by dynamic_slice.
    if num_blocks > 2:
        def body(state, i):
            start = head_width + i * width
            logits_xc = _block_logits(hidden_xd, kernel_block(start, width), options)
            return update(state, logits_xc, start), None

        state, _ = lax.scan(body, state, jnp.arange(num_blocks - 2, dtype=jnp.int32))

    # Last block [V - width, V).
    if num_blocks > 1:
        logits_xc = _block_logits(hidden_xd, kernel_block(vocab - width, width), options)
        state = update(state, logits_xc, vocab - width)
    return state, logits_xc


def _statistics_pass(hidden_xd, kernel_dv, targets_x, options):
    """Runs the statistics over all blocks; returns them and the `[N, C]` logits of the last block processed (for the
    gradient pass)."""
    n = hidden_xd.shape[0]
    stats = _Stats(max_x=jnp.full((n,), -jnp.inf, _F32), sumexp_x=jnp.zeros((n,), _F32),
                   target_logit_x=jnp.zeros((n,), _F32), logit_sum_x=jnp.zeros((n,), _F32))
    return _fold_blocks(hidden_xd, kernel_dv, options, stats,
                        lambda stats, logits_xc, start: _update_stats(stats, logits_xc, start, targets_x))


def _finish(stats: _Stats, weights_x, vocab, options):
    """Loss, metrics and the per-token `lse_x`, `ce_x` from the final statistics; also the loss denominator."""
    lse_x = stats.max_x + jnp.log(stats.sumexp_x)
    eps = options.label_smoothing
    # -sum_v q_v log p_v with q = (1 - eps) onehot + eps / V; since sum_v q_v = 1 this is lse - sum_v q_v logits_v.
    ce_x = lse_x - (1.0 - eps) * stats.target_logit_x
    if eps:
        ce_x = ce_x - (eps / vocab) * stats.logit_sum_x
    z_term_x = options.z_loss * jnp.square(lse_x)
    if options.z_loss:
        ce_x = ce_x + z_term_x
    weight_sum = jnp.sum(weights_x)
    # Denominator 1 for an all-ignored batch: every sum is then 0, so loss and gradients are 0, never NaN.
    denominator = jnp.where(weight_sum > 0, weight_sum, 1.0)

    def mean(values_x):
        # where(), not w * x alone: an ignored token's value must not leak in even if it is inf (0 * inf = NaN).
        return jnp.sum(jnp.where(weights_x != 0, weights_x * values_x, 0.0)) / denominator

    loss = mean(ce_x)
    metrics = {
        "nll": mean(lse_x - stats.target_logit_x),
        "z_loss": mean(z_term_x),
        "log_z": mean(lse_x),
        # The target is the argmax iff its logit equals the running max (bitwise: it is one of the logits that went
        # into the max). A tie for the max counts as correct; jnp.argmax would pick the lowest tied column.
        "accuracy": mean((stats.target_logit_x >= stats.max_x).astype(_F32)),
        "weight_sum": weight_sum,
    }
    return loss, metrics, lse_x, ce_x, denominator


def _gradient_pass(hidden_xd, kernel_dv, targets_x, scale_x, lse_x, last_logits_xc, options):
    """Gradients of `sum_x scale_x * ce_x` w.r.t. hidden (`[N, d]` fp32) and kernel (`[d, V]`, kernel dtype).

    `last_logits_xc` are the logits of the statistics pass's last block (the columns `[V - C, V)`), reused here.
    """
    vocab = kernel_dv.shape[1]
    num_blocks, width, head_width = chunk_plan(vocab, options.chunk_size)
    eps, softcap = options.label_smoothing, options.logit_softcap
    matmul_dtype = hidden_xd.dtype
    # d ce_x / d logits_xv = p_xv * (1 + 2 z lse_x) - (1 - eps) [v == y_x] - eps / V   (times tanh' with a soft-cap),
    # with the loss weight folded into the per-token factors.
    prob_scale_x = scale_x * (1.0 + 2.0 * options.z_loss * lse_x)
    target_scale_x = scale_x * (1.0 - eps)
    uniform_scale_x = scale_x * (eps / vocab)

    def block_gradients(logits_xc, kernel_dc, start):
        columns_c = start + jnp.arange(logits_xc.shape[1], dtype=jnp.int32)
        is_target_xc = columns_c[None, :] == targets_x[:, None]
        probs_xc = jnp.exp(logits_xc - lse_x[:, None])
        dlogits_xc = probs_xc * prob_scale_x[:, None] - jnp.where(is_target_xc, target_scale_x[:, None], 0.0)
        if eps:
            dlogits_xc = dlogits_xc - uniform_scale_x[:, None]
        if softcap is not None:
            # logits = c tanh(raw / c)  =>  d logits / d raw = 1 - tanh^2 = 1 - (logits / c)^2.
            dlogits_xc = dlogits_xc * (1.0 - jnp.square(logits_xc / softcap))
        dlogits_xc = dlogits_xc.astype(matmul_dtype)  # The one cast, after all fp32 arithmetic.
        dhidden_xd = lax.dot_general(dlogits_xc, kernel_dc.astype(matmul_dtype), (((1,), (1,)), ((), ())),
                                     preferred_element_type=_F32)
        dkernel_dc = lax.dot_general(hidden_xd, dlogits_xc, (((0,), (0,)), ((), ())),
                                     preferred_element_type=_F32).astype(kernel_dv.dtype)
        return dhidden_xd, dkernel_dc

    kernel_bits_dv = _bits(kernel_dv)

    def kernel_block(start, size):
        return _from_bits(lax.dynamic_slice_in_dim(kernel_bits_dv, start, size, axis=1), kernel_dv.dtype)

    def write_block(dkernel_bits_dv, dkernel_dc, start):
        return lax.dynamic_update_slice_in_dim(dkernel_bits_dv, _bits(dkernel_dc), start, axis=1)

    # Every column block of dkernel is written exactly once, in place: no kernel-sized fp32 accumulator.
    dkernel_bits_dv = jnp.zeros(kernel_dv.shape, kernel_bits_dv.dtype)

    # The last block first, from the logits still at hand (no recomputation).
    last_start = vocab - last_logits_xc.shape[1]
    dhidden_xd, dkernel_dc = block_gradients(last_logits_xc, kernel_block(last_start, last_logits_xc.shape[1]),
                                             last_start)
    dkernel_bits_dv = write_block(dkernel_bits_dv, dkernel_dc, last_start)

    if num_blocks > 1:
        kernel_dc = kernel_block(0, head_width)
        dhidden_head_xd, dkernel_dc = block_gradients(_block_logits(hidden_xd, kernel_dc, options), kernel_dc, 0)
        dhidden_xd = dhidden_xd + dhidden_head_xd
        dkernel_bits_dv = write_block(dkernel_bits_dv, dkernel_dc, 0)

    if num_blocks > 2:
        def body(carry, i):
            dhidden_xd, dkernel_bits_dv = carry
            start = head_width + i * width
            kernel_dc = kernel_block(start, width)
            dhidden_block_xd, dkernel_dc = block_gradients(_block_logits(hidden_xd, kernel_dc, options), kernel_dc,
                                                           start)
            return (dhidden_xd + dhidden_block_xd, write_block(dkernel_bits_dv, dkernel_dc, start)), None

        (dhidden_xd, dkernel_bits_dv), _ = lax.scan(body, (dhidden_xd, dkernel_bits_dv),
                                                    jnp.arange(num_blocks - 2, dtype=jnp.int32))
    return dhidden_xd, _from_bits(dkernel_bits_dv, kernel_dv.dtype)
