"""Parameter-efficient fine-tuning: the adapters `lm.model` builds, and the trees that keep them apart from the base.

`config.finetune.method` picks one (`full` trains every parameter and adds none):

- `lora` (Hu et al. 2021): a projection `x W` becomes `x W + (alpha / r) dropout(x) A B` with `A [*in, r]`,
  `B [r, *out]` on the projections `config.finetune.lora.targets` names. Initialisations (`lora.init`), and what
  the first step does with them:

  | init | update at step 0 | gradient of A at step 0 | gradient of B at step 0 |
  |---|---|---|---|
  | `a_gaussian_b_zero` (standard) | 0: the model is the base | 0 (it is multiplied by B = 0) | nonzero |
  | `a_zero_b_gaussian` | 0: the model is the base | nonzero | 0 (its input x A is 0) |
  | `both_gaussian` | nonzero: the model is not the base | nonzero | nonzero |

  The first is standard: the run starts from the base model exactly, and B's gradient `A^T x^T g` is a random
  projection of the full fine-tuning gradient, so the update grows along it; with A = 0 the same holds with the
  roles swapped, but the projection of the input is then learned from nothing. Gaussian factors have variance
  1 / fan-in (`nn.initializers.variance_scaling`), so `x A` and `(x A) B` keep the scale of their inputs.
- `prefix`: per layer, `length` learned key/value vectors `[p, kv_heads, head_dim]` that every query attends to,
  in a softmax of their own whose output is added through a per-head gate initialised to 0 (`tanh(gate)`,
  LLaMA-Adapter's zero-initialised attention), so step 0 is the base model. With `reparameterize`, each layer's
  prefixes are an MLP (`tanh`) of learned embeddings (Li & Liang 2021's reparameterisation).
- `loreft` (Wu et al. 2024): at the output of the layers `loreft.layers` names (all by default), a position's
  hidden state becomes `h + R^T (W h + b - R h)`: an edit inside the r-dimensional subspace spanned by R's rows.
  R `[r, d]` starts with orthonormal rows, W as R and b as 0, so the edit is 0 at step 0. `loreft.positions` says
  which positions: `all` (every one, prompt and completion, in training and in decoding), or pyreft's
  `f{N}` / `l{N}` / `f{N}+l{N}`: the first and/or last N tokens of each document's prompt (`prompt_lengths`;
  `lm.config.loreft_positions` reads the spec), the
  rest (the completion; every generated token) unedited.

Adapters live inside the model's one parameter tree (so `model.apply`, evaluation and sampling need nothing new),
under names no base parameter has (`ADAPTER_NAMES`); `split` takes a tree apart into the frozen base and the
trainable adapters, `combine` puts them back (no copies: the leaves are the same arrays), and `merge_lora` folds
LoRA updates into the base kernels for export.
"""

from __future__ import annotations

import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

PEFT_METHODS = ("lora", "prefix", "loreft")
# Parameter names (path elements) a base model does not have: the adapters' (LoRA factors, the prefix and LoReFT
# submodules), and a reward or value model's scalar head (`lm.model`), which a PEFT run trains beside its adapters.
ADAPTER_NAMES = frozenset({"lora_a", "lora_b", "prefix", "reft", "scalar_head", "scalar_bias"})


def is_peft(config) -> bool:
    """Whether the run trains adapters over a frozen base (`config.finetune.method` is not `full`)."""
    return config.finetune.method in PEFT_METHODS


def base_config(config):
    """`config` without adapters or scalar head (`finetune.method = "full"`, `objective = "lm"`): the model a PEFT
    run's frozen base is, and a DPO or PPO run's reference. Not a config to train (it is not validated)."""
    base = config.copy_and_resolve_references()
    base.finetune.method = "full"
    base.finetune.objective = "lm"
    return base


def lora_initializers(scheme: str, in_axes: int, out_axes: int):
    """`(init_a, init_b)` for `A [*in, r]` and `B [r, *out]` (`in_axes`, `out_axes`: how many axes `in` and `out`
    have) under one of the three schemes of the module docstring."""
    gaussian_a = nn.initializers.variance_scaling(
        1.0, "fan_in", "normal", in_axis=tuple(range(in_axes)), out_axis=-1)
    gaussian_b = nn.initializers.variance_scaling(
        1.0, "fan_in", "normal", in_axis=0, out_axis=tuple(range(1, 1 + out_axes)))
    zeros = nn.initializers.zeros
    return {"a_gaussian_b_zero": (gaussian_a, zeros), "a_zero_b_gaussian": (zeros, gaussian_b),
            "both_gaussian": (gaussian_a, gaussian_b)}[scheme]


class Prefix(nn.Module):
    """Gated prefix attention of one layer (module docstring): `[b, t, n, h]` queries -> `[b, t, n, h]` output to
    add to the layer's own attention output."""

    cfg: Any  # config.model (frozen)
    prefix: Any  # config.finetune.prefix (frozen)
    head_dim: int

    @nn.compact
    def __call__(self, q_btnh: jax.Array) -> jax.Array:
        cfg, p, h = self.cfg, self.prefix.length, self.head_dim
        g, n = cfg.num_kv_heads, cfg.num_heads
        param_dtype = jnp.dtype(cfg.param_dtype)
        normal = nn.initializers.normal(stddev=cfg.init_std)
        if self.prefix.reparameterize:
            embedding_pd = self.param("embedding", nn.with_logical_partitioning(normal, (None, "embed")),
                                      (p, cfg.d_model), param_dtype)
            hidden = nn.tanh(nn.Dense(self.prefix.hidden, dtype=cfg.dtype, param_dtype=param_dtype,
                                      kernel_init=nn.with_logical_partitioning(normal, ("embed", "mlp")),
                                      name="hidden")(embedding_pd))
            kv_p2gh = nn.DenseGeneral((2, g, h), dtype=cfg.dtype, param_dtype=param_dtype,
                                      kernel_init=nn.with_logical_partitioning(
                                          normal, ("mlp", None, "kv_heads", "head_dim")),
                                      name="key_value")(hidden)
            key_pgh, value_pgh = kv_p2gh[:, 0], kv_p2gh[:, 1]
        else:
            axes = (None, "kv_heads", "head_dim")
            key_pgh = self.param("key", nn.with_logical_partitioning(normal, axes), (p, g, h), param_dtype)
            value_pgh = self.param("value", nn.with_logical_partitioning(normal, axes), (p, g, h), param_dtype)
        gate_n = self.param("gate", nn.with_logical_partitioning(nn.initializers.zeros, ("heads",)), (n,),
                            param_dtype)
        b, t = q_btnh.shape[:2]
        q_btgrh = q_btnh.reshape(b, t, g, n // g, h)
        scores_btgrp = jnp.einsum("btgrh,pgh->btgrp", q_btgrh, key_pgh.astype(q_btnh.dtype),
                                  preferred_element_type=jnp.float32) / math.sqrt(h)
        probs_btgrp = jax.nn.softmax(scores_btgrp, axis=-1).astype(q_btnh.dtype)
        out_btgrh = jnp.einsum("btgrp,pgh->btgrh", probs_btgrp, value_pgh.astype(q_btnh.dtype))
        return out_btgrh.reshape(b, t, n, h) * jnp.tanh(gate_n.astype(q_btnh.dtype))[:, None]


def prompt_lengths(segment_ids_bt: jax.Array | None, weights_bt: jax.Array | None,
                   shape: tuple[int, int]) -> jax.Array:
    """int32 `[batch, length]`: for each input token, the length of its document's prompt, in tokens.

    A document is a run of equal `segment_ids` (None: one per row). Its prompt is its inputs up to the one that
    predicts its first trained target (`weights > 0`), that one included: the prompt of a prompt/completion example,
    all of it, wherever it sits in a packed row. A document with no trained target (`weights_bt` None: every
    document) is all prompt.
    """
    batch, length = shape
    index_bt = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), shape)
    if segment_ids_bt is None:
        starts_bt = index_bt == 0
    else:
        starts_bt = jnp.concatenate(
            [jnp.ones((batch, 1), bool), segment_ids_bt[:, 1:] != segment_ids_bt[:, :-1]], axis=1)
    start_bt = jax.lax.cummax(jnp.where(starts_bt, index_bt, 0), axis=1)
    start_at_or_after_bt = jax.lax.cummin(jnp.where(starts_bt, index_bt, length), axis=1, reverse=True)
    end_bt = jnp.concatenate([start_at_or_after_bt[:, 1:], jnp.full((batch, 1), length, jnp.int32)], axis=1)
    if weights_bt is None:
        return end_bt - start_bt
    trained_at_or_after_bt = jax.lax.cummin(jnp.where(weights_bt > 0, index_bt, length), axis=1, reverse=True)
    first_trained_bt = jnp.take_along_axis(trained_at_or_after_bt, start_bt, axis=1)
    return jnp.where(first_trained_bt < end_bt, first_trained_bt + 1, end_bt) - start_bt


def edit_mask(first_last: tuple[int, int], positions_bt: jax.Array, prompt_lengths_bt: jax.Array) -> jax.Array:
    """bool `[batch, length]`: the tokens LoReFT edits, the first `first` and the last `last` of each document's
    prompt (`positions_bt`: each token's position within its document)."""
    first, last = first_last
    in_prompt_bt = positions_bt < prompt_lengths_bt
    return in_prompt_bt & ((positions_bt < first) | (positions_bt >= prompt_lengths_bt - last))


class Reft(nn.Module):
    """The LoReFT edit of one layer's output (module docstring): `h + on * edit * R^T (W h + b - R h)`, `[b, t, d]`;
    `on` (a traced bool) is whether this layer is one of `loreft.layers`, `edit_bt` (bool `[b, t]`, `edit_mask`;
    None: every position) which tokens are edited."""

    cfg: Any
    loreft: Any

    @nn.compact
    def __call__(self, h_btd: jax.Array, on: jax.Array, edit_bt: jax.Array | None = None) -> jax.Array:
        cfg, rank = self.cfg, self.loreft.rank
        param_dtype = jnp.dtype(cfg.param_dtype)
        axes = ("reft_rank", "embed")
        rotation_ad = self.param("rotation", nn.with_logical_partitioning(nn.initializers.orthogonal(), axes),
                                 (rank, cfg.d_model), param_dtype)
        weight_ad = self.param("weight", nn.with_logical_partitioning(lambda *_: rotation_ad, axes),
                               (rank, cfg.d_model), param_dtype)
        bias_a = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("reft_rank",)), (rank,),
                            param_dtype)
        rotation_ad, weight_ad = rotation_ad.astype(h_btd.dtype), weight_ad.astype(h_btd.dtype)
        edit_bta = h_btd @ weight_ad.T + bias_a.astype(h_btd.dtype) - h_btd @ rotation_ad.T
        if edit_bt is not None:
            on = on & edit_bt[..., None]
        return h_btd + jnp.where(on, edit_bta @ rotation_ad, 0).astype(h_btd.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Trees.


def _is_adapter_path(path: tuple[str, ...]) -> bool:
    return any(name in ADAPTER_NAMES for name in path)


def split(params) -> tuple[dict, dict]:
    """`(base, adapters)`: the leaves of a parameter tree (or of a tree of the same structure: shardings, shapes)
    outside and inside adapters, each as a nested dict of the leaves it holds."""
    flat = flax.traverse_util.flatten_dict(params)
    base = {path: leaf for path, leaf in flat.items() if not _is_adapter_path(path)}
    adapters = {path: leaf for path, leaf in flat.items() if _is_adapter_path(path)}
    return flax.traverse_util.unflatten_dict(base), flax.traverse_util.unflatten_dict(adapters)


def combine(base, adapters) -> dict:
    """The one parameter tree `model.apply` takes: `base` with `adapters` put back (`split`'s inverse)."""
    flat = flax.traverse_util.flatten_dict(base)
    flat.update(flax.traverse_util.flatten_dict(adapters))
    return flax.traverse_util.unflatten_dict(flat)


def trainable(params, config) -> tuple[dict, dict]:
    """`(frozen, trainable)` of a run's parameter tree (or of a tree of its shape): what the train step reads but
    does not train, and what it trains. A PEFT run: `split` (the base is also a DPO or PPO run's reference). Full
    training: `({}, params)`, or for full-parameter DPO and PPO `(base, params)`, whose frozen tree is the reference
    model, a copy of the starting weights without the scalar head (`lm.dpo`, `lm.rl`; not for DPO on precomputed
    reference log-probabilities)."""
    if is_peft(config):
        return split(params)
    return (split(params)[0] if runs_reference_model(config) else {}), params


def runs_reference_model(config) -> bool:
    """Whether the run computes with a reference model: PPO, and DPO unless its reference log-probabilities are
    precomputed with the data (`config.finetune.dpo.reference`)."""
    objective = config.finetune.objective
    return objective == "ppo" or (objective == "dpo" and config.finetune.dpo.reference == "model")


def merge_lora(params, config) -> dict:
    """The base tree with every LoRA update folded into its kernel (`W + (alpha / r) A B`, computed in fp32 and
    stored in the kernel's dtype): a model without adapters that computes what the adapted one does."""
    lora = config.finetune.lora
    scale = lora.alpha / lora.rank
    flat = flax.traverse_util.flatten_dict(params)
    merged = {}
    for path, leaf in flat.items():
        if path[-1] in ("lora_a", "lora_b"):
            continue
        a = flat.get((*path[:-1], "lora_a")) if path[-1] == "kernel" else None
        if a is not None:
            b = flat[(*path[:-1], "lora_b")]
            leaf = (leaf.astype(jnp.float32) + scale * _lora_product(a, b, leaf.shape)).astype(leaf.dtype)
        merged[path] = leaf
    return flax.traverse_util.unflatten_dict(merged)


def _lora_product(a, b, kernel_shape) -> jax.Array:
    """`A B` in the kernel's shape; A `[(l,) *in, r]`, B `[(l,) r, *out]` (a leading layers axis when scanned)."""
    r = a.shape[-1]
    if a.ndim + b.ndim - 3 == len(kernel_shape):  # A leading layers axis on all three.
        layers = a.shape[0]
        product = jnp.einsum("lir,lro->lio", a.reshape(layers, -1, r).astype(jnp.float32),
                             b.reshape(layers, r, -1).astype(jnp.float32))
    else:
        product = a.reshape(-1, r).astype(jnp.float32) @ b.reshape(r, -1).astype(jnp.float32)
    return product.reshape(kernel_shape)


def count(tree) -> int:
    """Number of parameters in a tree of arrays or shapes."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))
