"""Mixture-of-experts MLP (Switch, GShard, Mixtral, DeepSeek-V2/V3): a router sends each token to `k` of `E` expert
MLPs and adds up their outputs weighted by its scores; DeepSeek's shared experts see every token.

Axis letters, beside the package legend (`lm/__init__.py`; `k` there is the rotary axis, so the top-k axis is `j`):

    e  routed experts                     j  the experts a token chose (its top-k slots; `experts_per_token`)
    c  one expert's capacity slots in a row (capacity routing)
    u  a row's token-expert assignments (t * j), in token order or sorted by expert (dropless routing)
    o  expert groups (group-limited routing)      i  experts within one group

`MoeMlp(cfg)(x_btd, weights_bt=None) -> (y_btd, stats)` stands in for `lm.layers.Mlp` when `cfg.moe.num_experts >
0`; `cfg` is the frozen `config.model` section and `cfg.moe` its MoE fields:

    y = sum_j gate_j * Expert_{e_j}(x) + SharedExperts(x)

Routing (`Router`), in fp32 whatever the compute dtype, as Hugging Face's `DeepseekV3TopkRouter` (sigmoid) and
`MixtralSparseMoeBlock` (softmax):
  1. logits_e = x @ router.kernel; probs_e = softmax(logits) or sigmoid(logits) (`moe.router`).
  2. Experts are chosen by `probs + router.bias` (DeepSeek-V3's `e_score_correction_bias`, aux-loss-free balancing),
     the bias under stop_gradient: it moves only the choice, never a weight or a gradient. With `moe.num_groups` > 1
     (DeepSeek-V3 group-limited routing) the experts form `num_groups` consecutive groups, a group scores the sum of
     its two best biased probabilities, and only the experts of the `top_groups` best groups can be chosen.
  3. The top `experts_per_token` biased probabilities name the experts; their gates are the unbiased probabilities,
     divided by their sum (+1e-20) when `moe.normalize_top_k` (Mixtral, DeepSeek-V3), then times
     `moe.routed_scaling` (DeepSeek-V3's routed_scaling_factor). Switch is k = 1, softmax, no normalisation.

Experts are SwiGLU (`silu(x gate) * (x up) down`) when `cfg.mlp_activation == "swiglu"`, else tanh-GELU
(`gelu(x up) down`), each `moe.expert_dim` wide and without biases. The `moe.shared_experts` always-on experts
(DeepSeek) are one dense `lm.layers.Mlp` of width `shared_experts * expert_dim`, which is their sum (Hugging Face's
`shared_experts` is built the same way); it has biases if `cfg.mlp_bias`.

Parameters (logical axis names for `lm.sharding`'s rules; `E` experts, `f` = `moe.expert_dim`, `S` =
`moe.shared_experts`):

    router/kernel   [d, E]     ("embed", None)             replicated over experts: it is small and every token
                                                            needs all E logits
    router/bias     [E]  fp32  (None,)                      zeros; moved by `updated_router_bias` in the train step,
                                                            never by the optimizer (its gradient is 0)
    gate, up        [E, d, f]  ("expert", "embed", "mlp")   (gate only for SwiGLU)
    down            [E, f, d]  ("expert", "mlp", "embed")
    shared/{gate,up}/kernel [d, S*f] ("embed", "mlp"), shared/down/kernel [S*f, d] ("mlp", "embed")   (S > 0)

Dispatch: two implementations, chosen by `moe.capacity_factor`. What GSPMD makes of them under a mesh axis
`expert` (the rule `("expert", "expert")`) was read from XLA:CPU's partitioned HLO (jax 0.10.2); other backends
may choose differently where the cost model decides.
  dropless (capacity_factor 0, exact: no token is ever dropped): each row's assignments are sorted by expert and run
    through a grouped matmul, `jax.lax.ragged_dot_general` with per-row group sizes, then unsorted and combined: t * k
    expert MLPs per row, differentiable (a gather and ragged_dot). This is MaxText's `sparse_matmul` (megablox /
    ragged_dot), which MaxText runs in shard_map with a ragged all-to-all of the tokens; here it is plain GSPMD, and
    sorting per row keeps it local to a row's data shard. Tokens replicated over `expert` (`batch` not mapped to
    it): XLA splits the ragged_dot over its groups, each device computes its own experts' rows, and the partial
    results are all-reduced over `expert` — `[b, t*k, f]` twice (gate and up, before the nonlinearity) and
    `[b, t*k, d]` once per layer. Tokens sharded over `expert` too: the expert kernels are all-gathered (FSDP-like,
    the layer's expert weights) and every device computes its own rows with every expert.
  capacity (capacity_factor > 0; GShard, Switch; MaxText's `dense_matmul`): within each row, assignments queue for
    their expert in token order (a token's j slots in order) and each expert takes at most
    `C = min(t, ceil(capacity_factor * t * k / E))` of them; the rest are dropped (they add nothing; the shared
    experts and the residual still carry the token). Dispatch and combine are one-hot tensors `[b, t, E, C]` applied
    by einsums, and the expert-major activations `[E, b, C, d]` are constrained to ("expert", "batch", None,
    "embed"), so each expert runs where its weights live (expert parallelism). Tokens replicated over `expert`: the
    dispatch is a local slice and the combine one all-reduce of `[b, t, d]` over `expert`. Tokens sharded over
    `expert` too (the usual expert parallelism, the other layers data parallel over it): a row's tokens are gathered
    over `expert` and the outputs reduced back (GShard's all-to-alls, as XLA:CPU chose them). For that, list the
    rule `("expert", "expert")` before a `("batch", (..., "expert"))` rule and follow it with a fallback `batch`
    rule without `expert`: Flax gives a mesh axis to one dimension of an array, the first rule to claim it, so
    `[E, b, C, d]` gets `expert` on E and the fallback on b (otherwise b takes `expert` and the expert kernels are
    all-gathered instead). The routing tensors cost b * t * E * C ~ b * t^2 * k * capacity_factor elements:
    capacity is per row (GShard's groups are rows), which keeps the queue local to a data shard and causal — a
    token's fate depends only on earlier tokens of its row, so next-token training sees no future — but is set by the
    row's length: a prompt prefilled at once may drop what training dropped, a token decoded alone never drops (C >=
    1 and a token's experts are distinct). Packed documents share their row's queue.

Padding: `weights_bt` (1 real, 0 padding; None: all real) keeps padding out of every statistic; under capacity
routing padding takes no slot (it is dropped, which is harmless: its output is never scored); dropless routing
routes it like any token (each token's output depends only on itself).

Statistics (`stats`, fp32, over the real tokens of the whole batch):
  load_e      [E]  fraction of the routed assignments (t * k per row) that chose each expert, before any capacity
                   drop: sums to 1. What `updated_router_bias` balances.
  dropped     []   fraction of the routed assignments dropped by capacity (0 when dropless).
  aux_loss    []   Switch/GShard load balancing, raw (the caller multiplies by `moe.aux_loss_coef`):
                   `E * sum_e load_e * P_e`, P_e the mean over tokens of expert e's router probability (sigmoid
                   probabilities are first divided by their sum over experts, DeepSeek-V3's sequence-wise balance
                   loss does the same). 1 for uniform routing, its minimum when load and probability agree; E when
                   every token goes to one expert. With k > 1 this is Hugging Face Mixtral's
                   `load_balancing_loss_func` divided by k, and DeepSeek-V3's balance loss over the batch instead of a
                   sequence. Differentiable through P only (load comes from a discrete choice).
  router_z_loss [] ST-MoE's router z-loss, raw (caller multiplies by `moe.router_z_loss_coef`): the mean over tokens
                   of logsumexp(logits)^2.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from lm import layers
from lm.errors import ConfigError

# One ragged matmul per row: lhs `[b, u, in]` ragged along u (the row's assignments, sorted by expert), rhs
# `[E, in, out]` grouped along E, group sizes `[b, E]`: out `[b, u, out]`.
_RAGGED_ROWS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([2], [1]), ([], [])), lhs_ragged_dimensions=[1], rhs_group_dimensions=[0])


def check_config(cfg) -> None:
    """Raises `ConfigError` naming the `config.model.moe` field if the routing cannot be built."""
    moe = cfg.moe
    if moe.router not in ("softmax", "sigmoid"):
        raise ConfigError(f"config.model.moe.router={moe.router!r} is not one of softmax, sigmoid")
    if not 0 < moe.experts_per_token <= moe.num_experts:
        raise ConfigError(f"config.model.moe.experts_per_token={moe.experts_per_token} must be in [1, num_experts="
                          f"{moe.num_experts}]")
    if moe.num_groups > 1:
        per_group = moe.num_experts // moe.num_groups
        if moe.num_experts % moe.num_groups or per_group < 2:
            raise ConfigError(f"config.model.moe.num_groups={moe.num_groups} must split num_experts="
                              f"{moe.num_experts} into groups of at least 2 (a group scores its top two experts)")
        if not 0 < moe.top_groups <= moe.num_groups or moe.top_groups * per_group < moe.experts_per_token:
            raise ConfigError(f"config.model.moe.top_groups={moe.top_groups} must be in [1, num_groups] and hold "
                              f"experts_per_token={moe.experts_per_token} experts")
    if moe.capacity_factor < 0:
        raise ConfigError(f"config.model.moe.capacity_factor={moe.capacity_factor} must be >= 0 (0: dropless)")


def updated_router_bias(bias_e: jax.Array, load_e: jax.Array, rate: float) -> jax.Array:
    """DeepSeek-V3's aux-loss-free balancing step: `bias + rate * sign(mean(load) - load_e)`, so experts above the
    mean load become less likely to be chosen and those below more. `bias_e`, `load_e`: `[..., E]` (leading axes,
    e.g. scanned layers, are kept apart; `load_e` is `stats["load_e"]`). Applied after each optimizer update."""
    mean_load = jnp.mean(load_e, axis=-1, keepdims=True)
    return bias_e + rate * jnp.sign(mean_load - load_e).astype(bias_e.dtype)


class Router(nn.Module):
    """Chooses each token's experts (module docstring, Routing). Returns fp32 `(logits_bte, probs_bte, experts_btj
    int32, gates_btj)`."""

    cfg: ml_collections.FrozenConfigDict

    @nn.compact
    def __call__(self, x_btd: jax.Array):
        cfg, moe = self.cfg, self.cfg.moe
        e = moe.num_experts
        kernel_de = self.param(
            "kernel", nn.with_logical_partitioning(layers.kernel_init(cfg, (0,), (1,), False), ("embed", None)),
            (cfg.d_model, e), jnp.dtype(cfg.param_dtype))
        bias_e = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (None,)), (e,), jnp.float32)
        # HIGHEST: fp32 for real on TPU and GPU too (not bf16 passes / TF32); a choice is a discontinuity.
        logits_bte = jnp.einsum("btd,de->bte", x_btd.astype(jnp.float32), kernel_de.astype(jnp.float32),
                                precision=jax.lax.Precision.HIGHEST)
        probs_bte = jax.nn.softmax(logits_bte) if moe.router == "softmax" else jax.nn.sigmoid(logits_bte)
        choice_bte = jax.lax.stop_gradient(probs_bte + bias_e)
        if moe.num_groups > 1:
            choice_bte = _limit_to_top_groups(choice_bte, moe.num_groups, moe.top_groups)
        _, experts_btj = _top_k(choice_bte, moe.experts_per_token)
        gates_btj = jnp.take_along_axis(probs_bte, experts_btj, axis=-1)
        if moe.normalize_top_k:
            gates_btj = gates_btj / (jnp.sum(gates_btj, axis=-1, keepdims=True) + 1e-20)
        return logits_bte, probs_bte, experts_btj, gates_btj * moe.routed_scaling


def _limit_to_top_groups(choice_bte: jax.Array, num_groups: int, top_groups: int) -> jax.Array:
    """`choice_bte` with the experts outside each token's `top_groups` best groups set to -inf; a group's score is
    the sum of its two best choice scores (DeepSeek-V3, as Hugging Face's `DeepseekV3TopkRouter`)."""
    b, t, e = choice_bte.shape
    choice_btoi = choice_bte.reshape(b, t, num_groups, e // num_groups)
    group_bto = jnp.sum(_top_k(choice_btoi, 2)[0], axis=-1)
    _, best_groups = _top_k(group_bto, top_groups)  # [b, t, top_groups] group ids
    kept_bto = jnp.sum(jax.nn.one_hot(best_groups, num_groups, dtype=jnp.int32), axis=-2) > 0
    return jnp.where(kept_bto[..., None], choice_btoi, -jnp.inf).reshape(b, t, e)


def _top_k(scores: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`(values, int32 indices)` of the `k` largest scores along the last axis, the lower index first among equals
    (as `jax.lax.top_k`). A sort, because GSPMD partitions a sort along its other axes, while it all-gathers a
    batch-sharded `lax.top_k` (seen on XLA:CPU, jax 0.10): every token's routing would be computed everywhere."""
    last = scores.ndim - 1
    index = jax.lax.broadcasted_iota(jnp.int32, scores.shape, last)
    negated, index = jax.lax.sort((-scores, index), dimension=last, is_stable=True, num_keys=1)
    return -negated[..., :k], index[..., :k]


def _stacked_init(cfg, output_projection: bool):
    """Initializer of `[E, in, out]` expert kernels: each expert's `[in, out]` as a dense projection's (so xavier
    and he see the fans of one expert, not E times them)."""
    per_expert = layers.kernel_init(cfg, (0,), (1,), output_projection)

    def init(key, shape, dtype):
        # lax.map, not vmap: XLA:CPU compiles the batched truncated normal several times slower (seconds per kernel).
        return jax.lax.map(lambda k: per_expert(k, shape[1:], dtype), jax.random.split(key, shape[0]))

    return init


def _expert_mlp(cfg, x, kernels: dict[str, jax.Array], matmul, hidden_axes: tuple) -> jax.Array:
    """SwiGLU or GELU expert MLPs on expert-arranged inputs, through `matmul(x, kernel_eio)` (ragged or batched)."""
    if cfg.mlp_activation == "swiglu":
        h = nn.silu(matmul(x, kernels["gate"])) * matmul(x, kernels["up"])
    else:
        h = nn.gelu(matmul(x, kernels["up"]), approximate=True)
    return matmul(nn.with_logical_constraint(h, hidden_axes), kernels["down"])


def _dropless(cfg, x_btd, experts_btj, gates_btj, kernels) -> jax.Array:
    """Every assignment through its expert: per row, sort by expert, grouped matmuls, unsort, combine. `[b, t, d]`
    fp32."""
    b, t, j = experts_btj.shape
    e = kernels["down"].shape[0]
    experts_bu = experts_btj.reshape(b, t * j)
    # Stable, so each expert's assignments stay in token order (any order would do; this one is reproducible).
    order_bu = jnp.argsort(experts_bu, axis=-1, stable=True)
    x_bud = jnp.take_along_axis(x_btd, (order_bu // j)[..., None], axis=1)
    x_bud = nn.with_logical_constraint(x_bud, ("batch", None, "embed"))
    sizes_be = jnp.sum(jax.nn.one_hot(experts_bu, e, dtype=jnp.int32), axis=1)
    matmul = functools.partial(_ragged_rows, group_sizes_be=sizes_be)
    y_bud = _expert_mlp(cfg, x_bud, kernels, matmul, ("batch", None, "mlp"))
    y_btjd = jnp.take_along_axis(y_bud, jnp.argsort(order_bu, axis=-1)[..., None], axis=1).reshape(b, t, j, -1)
    return jnp.einsum("btjd,btj->btd", y_btjd.astype(jnp.float32), gates_btj)


def _ragged_rows(x_bui, kernel_eio, group_sizes_be):
    return jax.lax.ragged_dot_general(x_bui, kernel_eio, group_sizes_be, _RAGGED_ROWS)


def capacity(cfg, length: int) -> int:
    """Slots per expert per row under capacity routing: `min(length, ceil(capacity_factor * length * k / E))`
    (more than `length` could never fill: a token's experts are distinct)."""
    moe = cfg.moe
    return min(length, math.ceil(moe.capacity_factor * length * moe.experts_per_token / moe.num_experts))


def _with_capacity(cfg, x_btd, experts_btj, gates_btj, real_bt, kernels):
    """GShard dispatch and combine (module docstring). Returns `(y_btd fp32, kept_btj bool)`: kept is False for the
    assignments dropped by capacity and for padding."""
    b, t, j = experts_btj.shape
    e = kernels["down"].shape[0]
    slots = capacity(cfg, t)
    assigned_btje = jax.nn.one_hot(experts_btj, e, dtype=jnp.int32) * (real_bt > 0)[..., None, None]
    # 1-based place of each assignment in its expert's queue: assignments queue in token order, a token's slots in
    # order. The cumulative sum runs along a row only, so it stays on the row's data shard.
    place_btje = jnp.cumsum(assigned_btje.reshape(b, t * j, e), axis=1).reshape(b, t, j, e) * assigned_btje
    kept_btje = (place_btje > 0) & (place_btje <= slots)
    # A token's experts are distinct, so at most one of its j slots holds a given expert: summing over j loses
    # nothing. Slot -1 (not dispatched) is an all-zero one-hot row.
    slot_bte = jnp.sum(jnp.where(kept_btje, place_btje, 0), axis=2) - 1
    dispatch_btec = jax.nn.one_hot(slot_bte, slots, dtype=cfg.dtype)
    gate_bte = jnp.einsum("btje,btj->bte", kept_btje.astype(jnp.float32), gates_btj)
    combine_btec = dispatch_btec * gate_bte[..., None].astype(cfg.dtype)
    x_ebcd = nn.with_logical_constraint(jnp.einsum("btd,btec->ebcd", x_btd, dispatch_btec),
                                        ("expert", "batch", None, "embed"))
    matmul = lambda x_ebci, kernel_eio: jnp.einsum("ebci,eio->ebco", x_ebci, kernel_eio)
    y_ebcd = nn.with_logical_constraint(
        _expert_mlp(cfg, x_ebcd, kernels, matmul, ("expert", "batch", None, "mlp")), ("expert", "batch", None, "embed"))
    y_btd = jnp.einsum("ebcd,btec->btd", y_ebcd, combine_btec, preferred_element_type=jnp.float32)
    return y_btd, jnp.any(kept_btje, axis=-1)


def routing_stats(logits_bte, probs_bte, experts_btj, real_bt, kept_btj=None, router: str = "softmax"):
    """The `stats` dict of the module docstring, fp32. `real_bt`: 1 for real tokens, 0 for padding; `kept_btj`:
    which assignments capacity kept (None: all, dropless)."""
    e = probs_bte.shape[-1]
    assigned_btje = jax.nn.one_hot(experts_btj, e, dtype=jnp.float32) * real_bt[..., None, None]
    assignments = jnp.maximum(jnp.sum(assigned_btje), 1.0)
    tokens = jnp.maximum(jnp.sum(real_bt), 1.0)
    load_e = jnp.sum(assigned_btje, axis=(0, 1, 2)) / assignments
    share_bte = probs_bte if router == "softmax" else probs_bte / jnp.sum(probs_bte, axis=-1, keepdims=True)
    mean_prob_e = jnp.einsum("bte,bt->e", share_bte, real_bt) / tokens
    z_bt = jax.nn.logsumexp(logits_bte, axis=-1)
    dropped = jnp.float32(0.0) if kept_btj is None else jnp.sum(
        real_bt[..., None] * ~kept_btj) / assignments
    return {
        "load_e": load_e,
        "dropped": dropped,
        "aux_loss": e * jnp.sum(load_e * mean_prob_e),
        "router_z_loss": jnp.sum(jnp.square(z_bt) * real_bt) / tokens,
    }


class MoeMlp(nn.Module):
    """The mixture-of-experts MLP (module docstring). `cfg`: `lm.model.model_config(config)` with a `moe` section."""

    cfg: ml_collections.FrozenConfigDict

    @nn.compact
    def __call__(self, x_btd: jax.Array, weights_bt: jax.Array | None = None):
        """`x_btd` `[b, t, d]` in the compute dtype; `weights_bt` `[b, t]` 1 for real tokens, 0 for padding (None:
        all real). Returns `(y_btd, stats)`: `[b, t, d]` in the compute dtype and the dict of fp32 statistics."""
        cfg, moe = self.cfg, self.cfg.moe
        check_config(cfg)
        real_bt = jnp.ones(x_btd.shape[:2], jnp.float32) if weights_bt is None else weights_bt.astype(jnp.float32)
        logits_bte, probs_bte, experts_btj, gates_btj = Router(cfg, name="router")(x_btd)
        kernels = self._expert_kernels()
        if moe.capacity_factor > 0:
            routed_btd, kept_btj = _with_capacity(cfg, x_btd, experts_btj, gates_btj, real_bt, kernels)
        else:
            routed_btd, kept_btj = _dropless(cfg, x_btd, experts_btj, gates_btj, kernels), None
        y_btd = routed_btd.astype(cfg.dtype)
        if moe.shared_experts > 0:
            # From a dict: `as_configdict()` (and `ConfigDict(cfg)` for nested fields) would hand back cfg's own
            # storage, and writing there changes cfg's hash, which jit caches on.
            shared_cfg = ml_collections.FrozenConfigDict(
                {**cfg.to_dict(), "mlp_dim": moe.shared_experts * moe.expert_dim})
            y_btd = y_btd + layers.Mlp(shared_cfg, name="shared")(x_btd)
        stats = routing_stats(logits_bte, probs_bte, experts_btj, real_bt, kept_btj, moe.router)
        return nn.with_logical_constraint(y_btd, ("batch", "length", "embed")), stats

    def _expert_kernels(self) -> dict[str, jax.Array]:
        """The stacked expert kernels in the compute dtype: `gate` (SwiGLU only), `up` `[E, d, f]`, `down`
        `[E, f, d]`."""
        cfg, moe = self.cfg, self.cfg.moe
        e, d, f = moe.num_experts, cfg.d_model, moe.expert_dim
        names = ("gate", "up") if cfg.mlp_activation == "swiglu" else ("up",)
        param = lambda name, shape, axes, output: self.param(
            name, nn.with_logical_partitioning(_stacked_init(cfg, output), axes), shape, jnp.dtype(cfg.param_dtype))
        kernels = {name: param(name, (e, d, f), ("expert", "embed", "mlp"), False) for name in names}
        kernels["down"] = param("down", (e, f, d), ("expert", "mlp", "embed"), True)
        return {name: kernel.astype(cfg.dtype) for name, kernel in kernels.items()}
