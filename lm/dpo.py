"""Direct preference optimisation (Rafailov et al. 2023) on preference batches, and the sequence log-probabilities
it (and PPO) compares.

    batch (`lm.data.preference`: chosen in row 2i, rejected in row 2i + 1)
      ─▶ model.apply ─▶ per-token log p(target) (`lm.loss.token_log_probs`: blockwise, differentiable)
      ─▶ summed over each row's trained tokens: `[rows]` ─▶ `[pairs, 2]`, the policy's and the reference's
      ─▶ `preference_loss`

With the log-ratios `r_c = log pi(chosen) - log ref(chosen)`, `r_r` likewise, and `h = r_c - r_r`, the losses
(`config.finetune.dpo.loss`) are, per pair:

- `sigmoid` (DPO): `-(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)`; `e = label_smoothing` > 0 is
  conservative DPO (Mitchell 2023: the preference label is wrong with probability e). At `pi = ref`: log 2.
- `ipo` (Azar et al. 2023): `(h' - 1 / (2 beta))^2` with `h'` from length-normalised log-ratios (each divided by its
  completion's trained-token count), as TRL computes it.

`sft_weight` > 0 adds that times the chosen completions' mean token NLL (TRL's `loss_type=["sigmoid", "sft"]`, RPO):
a token mean over the batch, so with `config.optim.microbatches` > 1 it is the pair-weighted mean of each
micro-batch's token mean, not exactly the whole batch's (metric `sft_nll`).

Metrics, under the names TRL logs: `rewards/chosen` and `rewards/rejected` (means of `beta r_c`, `beta r_r`),
`rewards/accuracies` (the fraction of pairs with `beta r_c > beta r_r`), `rewards/margins` (mean of their difference),
`logps/chosen` and `logps/rejected` (means of the policy's summed log-probabilities). Padding pairs (no trained token,
`lm.data.preference.stack`) count in none of them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from lm import loss as loss_lib
from lm import model as model_lib
from lm import objective
from lm import peft
from lm.data import REFERENCE_FEATURE

LOSSES = ("sigmoid", "ipo")


def dpo_loss(trainable, frozen, batch: dict[str, jax.Array], model: model_lib.Transformer,
             reference_model: model_lib.Transformer, config: ml_collections.ConfigDict,
             rng: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`config.finetune.dpo`'s loss of the policy `peft.combine(frozen, trainable)` against the reference
    `reference_model` (the model without adapters) on `frozen`: a PEFT run's base (its adapters switched off, no
    second copy of the weights), or full-parameter DPO's copy of the starting weights (`lm.peft.trainable`); or
    against the reference log-probabilities the batch carries (`reference_log_probs`, precomputed with the data).

    Returns `(loss, aux)`: aux holds the metrics of the module docstring and `weight_sum`, the number of pairs the
    loss is a mean over (gradient accumulation weights micro-batches by it).
    """
    settings = config.finetune.dpo

    def log_probs(params, module, rng):
        hidden_btd, kernel_dv = objective.batch_hidden_and_head(params, batch, module, rng)
        return sequence_log_probs(hidden_btd, kernel_dv, batch["targets"], batch["weights"],
                                  chunk_size=config.loss.chunk_size, logit_softcap=config.model.logit_softcap)

    policy_b, tokens_b = log_probs(peft.combine(frozen, trainable), model, rng)
    if REFERENCE_FEATURE in batch:  # Precomputed (`config.finetune.dpo.reference`): no reference forward.
        reference_b = jnp.sum(batch[REFERENCE_FEATURE], axis=1)
    else:
        reference_b, _ = log_probs(frozen, reference_model, None)
    loss, metrics = preference_loss(policy_b, jax.lax.stop_gradient(reference_b), tokens_b, beta=settings.beta,
                                    loss=settings.loss, label_smoothing=settings.label_smoothing,
                                    sft_weight=settings.sft_weight)
    metrics["weight_sum"] = metrics.pop("pairs")
    return loss, metrics


def sequence_log_probs(hidden_btd: jax.Array, kernel_dv: jax.Array, targets_bt: jax.Array, weights_bt: jax.Array,
                       *, chunk_size: int, logit_softcap: float | None = None) -> tuple[jax.Array, jax.Array]:
    """`(log_prob_b, tokens_b)`, fp32 `[batch]`: each row's summed log-probability of its trained targets
    (`weights_bt > 0`, weighted) and their weight sum. One sequence per row; differentiable in hidden and kernel."""
    log_prob_bt, _ = loss_lib.token_log_probs(hidden_btd, kernel_dv, targets_bt, chunk_size=chunk_size,
                                              logit_softcap=logit_softcap)
    weights_bt = weights_bt.astype(jnp.float32)
    # where(), not a product alone: a padding token's log-prob may be -inf, and 0 * -inf is NaN.
    return jnp.sum(jnp.where(weights_bt > 0, weights_bt * log_prob_bt, 0.0), axis=1), jnp.sum(weights_bt, axis=1)


def preference_loss(policy_b: jax.Array, reference_b: jax.Array, tokens_b: jax.Array, *, beta: float,
                    loss: str = "sigmoid", label_smoothing: float = 0.0, sft_weight: float = 0.0
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The mean loss over the valid pairs of a batch, and the metrics of the module docstring.

    Args:
      policy_b, reference_b: fp32 `[2 * pairs]` summed log-probabilities of each row (`sequence_log_probs`) under
        the policy and the reference; rows `2i` chosen, `2i + 1` rejected.
      tokens_b: fp32 `[2 * pairs]` trained-token counts; a pair whose chosen row has none is padding.
      beta, loss, label_smoothing, sft_weight: `config.finetune.dpo`'s (module docstring).

    Returns:
      `(loss, metrics)`: fp32 scalars; `metrics["pairs"]` is the number of valid pairs (a sum; the rest are means).
    """
    policy_p2, reference_p2, tokens_p2 = (x.reshape(-1, 2) for x in (policy_b, reference_b, tokens_b))
    valid_p = (tokens_p2[:, 0] > 0).astype(jnp.float32)
    pairs = jnp.sum(valid_p)

    def mean(values_p):
        return jnp.sum(jnp.where(valid_p > 0, values_p, 0.0)) / jnp.maximum(pairs, 1.0)

    log_ratio_p2 = policy_p2 - reference_p2
    if loss == "sigmoid":
        margin_p = beta * (log_ratio_p2[:, 0] - log_ratio_p2[:, 1])
        losses_p = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(margin_p) - label_smoothing * jax.nn.log_sigmoid(
            -margin_p)
    elif loss == "ipo":
        normalised_p2 = log_ratio_p2 / jnp.maximum(tokens_p2, 1.0)
        losses_p = jnp.square(normalised_p2[:, 0] - normalised_p2[:, 1] - 1.0 / (2.0 * beta))
    else:
        raise ValueError(f"loss={loss!r} is not one of {', '.join(LOSSES)}")
    rewards_p2 = jax.lax.stop_gradient(beta * log_ratio_p2)
    metrics = {
        "rewards/chosen": mean(rewards_p2[:, 0]),
        "rewards/rejected": mean(rewards_p2[:, 1]),
        "rewards/accuracies": mean((rewards_p2[:, 0] > rewards_p2[:, 1]).astype(jnp.float32)),
        "rewards/margins": mean(rewards_p2[:, 0] - rewards_p2[:, 1]),
        "logps/chosen": mean(jax.lax.stop_gradient(policy_p2[:, 0])),
        "logps/rejected": mean(jax.lax.stop_gradient(policy_p2[:, 1])),
        "pairs": pairs,
    }
    if sft_weight:  # TRL's "sft" loss term: the mean token NLL over the batch's chosen completions.
        metrics["sft_nll"] = -jnp.sum(jnp.where(valid_p > 0, policy_p2[:, 0], 0.0)) / jnp.maximum(
            jnp.sum(tokens_p2[:, 0]), 1.0)
        return mean(losses_p) + sft_weight * metrics["sft_nll"], metrics
    return mean(losses_p), metrics
