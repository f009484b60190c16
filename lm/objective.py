"""The language-modelling objective on one batch, shared by the train step and the eval step; and the per-token
scores of a batch (`target_log_probs`: `lm.evaluate.token_losses`, the lm-evaluation-harness model).

    batch ─▶ model.apply ─▶ hidden_btd ─▶ lm.loss.cross_entropy(hidden_btd, LM head [d, v], targets, weights)

A batch is a dict of `[batch, length]` arrays: `inputs`, `targets` (int32), and optionally `weights` (float32, 0 on
padding), `segment_ids` and `positions` (int32) for packed rows (`lm.data.packing`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections

from lm import loss as loss_lib
from lm import model as model_lib
from lm import peft


def lm_loss(params, batch: dict[str, jax.Array], model: model_lib.Transformer, config: ml_collections.ConfigDict,
            rng: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Chunked cross-entropy of `model` on `batch`: `(loss, aux)` as `lm.loss.cross_entropy` returns them.

    The logits are never formed whole: the LM head is applied block by block over the vocabulary inside the loss,
    soft-capped by `config.model.logit_softcap` as `Transformer.logits` is. `rng`: the dropout key in training
    (adapters with dropout, `lm.peft`), None otherwise.
    """

    prompt_lengths_bt = peft.prompt_lengths(batch.get("segment_ids"), batch.get("weights"), batch["inputs"].shape)
    (hidden_btd, kernel_dv), variables = _hidden_and_head(
        params, batch["inputs"], model, batch.get("positions"), batch.get("segment_ids"), prompt_lengths_bt, rng,
        mutable=["intermediates"])
    loss, aux = loss_lib.cross_entropy(
        hidden_btd, kernel_dv, batch["targets"], batch.get("weights"), chunk_size=config.loss.chunk_size,
        z_loss=config.loss.z_loss, label_smoothing=config.loss.label_smoothing,
        logit_softcap=config.model.logit_softcap)
    moe_loss, moe_metrics = moe_terms(model_lib.moe_stats_of(variables), config)
    return loss + moe_loss, {**aux, **moe_metrics}


def moe_terms(stats: dict[str, jax.Array], config: ml_collections.ConfigDict) -> tuple[jax.Array, dict]:
    """The mixture-of-experts terms of the training loss, `aux_loss_coef * aux_loss + router_z_loss_coef *
    router_z_loss` (each the mean over the MoE layers), and their metrics; `(0, {})` for a dense model.

    Metrics: `moe/aux_loss`, `moe/router_z_loss`, `moe/dropped` (fraction of token-expert assignments dropped by
    capacity, over the layers), `moe/max_load` (the most loaded expert of any layer over the mean load: 1 is
    perfectly balanced), `moe/load/{e}` (expert e's share of the assignments, averaged over the layers: the
    per-expert load), and `moe/load_le` `[moe layers, experts]`, which the train step consumes (DeepSeek-V3's bias
    balancing, `lm.moe.updated_router_bias`) rather than logs.
    """
    if not stats:
        return jnp.float32(0.0), {}
    moe = config.model.moe
    aux_loss, z_loss = jnp.mean(stats["aux_loss"]), jnp.mean(stats["router_z_loss"])
    load_le = stats["load_e"]
    metrics = {"moe/aux_loss": aux_loss, "moe/router_z_loss": z_loss, "moe/dropped": jnp.mean(stats["dropped"]),
               "moe/max_load": jnp.max(load_le) * load_le.shape[-1], "moe/load_le": load_le,
               **{f"moe/load/{e}": load for e, load in enumerate(jnp.mean(load_le, axis=0))}}
    return moe.aux_loss_coef * aux_loss + moe.router_z_loss_coef * z_loss, metrics


def target_log_probs(params, inputs_bt: jax.Array, targets_bt: jax.Array, model: model_lib.Transformer,
                     config: ml_collections.ConfigDict, candidates: tuple[jax.Array, jax.Array] | None = None,
                     prompt_length_b: jax.Array | None = None):
    """`(log_prob_bt, is_argmax_bt)` of each target given the inputs up to it (one sequence per row, no packing):
    fp32 and bool `[batch, length]`, blockwise over the vocabulary (`lm.loss.token_log_probs`). `prompt_length_b`
    (int32 `[batch]`): how many of each row's inputs are its prompt (a context to score a continuation after: what
    LoReFT runs editing chosen prompt positions read); None: all of them.

    With `candidates = (position_b, candidates_bk)` (int32 `[batch]`, `[batch, K]`), also `(log_prob_bk,
    is_argmax_bk)`: K other targets scored at one position of each row, from the same forward pass (the choices of a
    multiple-choice question whose inputs are the same).
    """
    prompt_lengths_bt = None if prompt_length_b is None else jnp.broadcast_to(prompt_length_b[:, None],
                                                                              inputs_bt.shape)
    hidden_btd, kernel_dv = _hidden_and_head(params, inputs_bt, model, prompt_lengths_bt=prompt_lengths_bt)
    scores = functools.partial(loss_lib.token_log_probs, kernel=kernel_dv, chunk_size=config.loss.chunk_size,
                               logit_softcap=config.model.logit_softcap)
    log_prob_bt, is_argmax_bt = scores(hidden_btd, targets=targets_bt)
    if candidates is None:
        return log_prob_bt, is_argmax_bt
    position_b, candidates_bk = candidates
    hidden_bd = jnp.take_along_axis(hidden_btd, position_b[:, None, None], axis=1)[:, 0]
    hidden_bkd = jnp.broadcast_to(hidden_bd[:, None], (*candidates_bk.shape, hidden_bd.shape[-1]))
    return (log_prob_bt, is_argmax_bt), scores(hidden_bkd, targets=candidates_bk)


def batch_hidden_and_head(params, batch: dict[str, jax.Array], model: model_lib.Transformer,
                          rng: jax.Array | None = None, head=model_lib.Transformer.output_kernel):
    """The final hidden states `[batch, length, d]` of a batch (compute dtype) and `head(module)`: by default the LM
    head `[d, vocab]` (compute dtype); `Transformer.scalar_weights` for a reward or value model's scalar head."""
    # A LoReFT run that edits chosen prompt positions reads where each example's prompt ends from the weights.
    prompt_lengths_bt = peft.prompt_lengths(batch.get("segment_ids"), batch.get("weights"), batch["inputs"].shape)
    return _hidden_and_head(params, batch["inputs"], model, batch.get("positions"), batch.get("segment_ids"),
                            prompt_lengths_bt, rng, head)


def _hidden_and_head(params, inputs_bt, model, positions_bt=None, segment_ids_bt=None, prompt_lengths_bt=None,
                     rng=None, head=model_lib.Transformer.output_kernel, mutable=False):
    """The final hidden states `[batch, length, d]` and `head(module)` (the LM head `[d, vocab]`: compute dtype);
    with `mutable` collections (`["intermediates"]`: a mixture of experts' routing statistics), `(that, variables)`
    as `apply` returns them."""

    def hidden_and_head(module: model_lib.Transformer):
        return module(inputs_bt, positions_bt, segment_ids_bt, prompt_lengths_bt), head(module)

    rngs = None if rng is None else {"dropout": rng}
    return model.apply({"params": params}, method=hidden_and_head, rngs=rngs, mutable=mutable)
