"""Reward models: an lm model with a scalar head (`lm.model.scalar_values`), trained on preference pairs under the
Bradley-Terry model, `P(chosen > rejected) = sigmoid(r_c - r_r)` (`config.finetune.objective = "reward"`).

    batch (`lm.data.preference`: chosen in row 2i, rejected in row 2i + 1)
      ─▶ model.apply ─▶ hidden_btd ─▶ scalar head at each row's last trained position: score_b ─▶ `[pairs, 2]`
      ─▶ `-log sigmoid(r_c - r_r)` (+ `center_coef * mean((r_c + r_r)^2)`, TRL's `center_rewards_coefficient`)

A row's score is read where the model predicts the row's last trained token (a completion's EOS): the hidden state
that has read the prompt and the completion's text, up to its EOS. PPO (`lm.rl`) scores its rollouts the same way (`sequence_scores`
on rows whose trained tokens are the response). The head starts at 0, so every pair starts at loss log 2.

Metrics, under the names TRL's `RewardTrainer` logs: `accuracy` (the fraction of pairs with `r_c > r_r`: the pairwise
accuracy the evaluation reports), `margin` (mean `r_c - r_r`), `mean_reward` (mean over both sides).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from lm import model as model_lib
from lm import objective
from lm import peft


def reward_loss(trainable, frozen, batch: dict[str, jax.Array], model: model_lib.Transformer,
                config: ml_collections.ConfigDict, rng: jax.Array | None = None
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The Bradley-Terry loss of the reward model `peft.combine(frozen, trainable)` on a preference batch: `(loss,
    aux)`, aux the module docstring's metrics and `weight_sum` (the number of pairs the loss is a mean over)."""
    score_b = sequence_scores(peft.combine(frozen, trainable), batch, model, rng)
    loss, metrics = bradley_terry_loss(score_b, batch["weights"], center_coef=config.finetune.reward.center_coef)
    metrics["weight_sum"] = metrics.pop("pairs")
    return loss, metrics


def sequence_scores(params, batch: dict[str, jax.Array], model: model_lib.Transformer,
                    rng: jax.Array | None = None) -> jax.Array:
    """fp32 `[batch]`: the scalar head at each row's last trained position (`batch["weights"] > 0`; one sequence per
    row). A row with no trained token gets its position 0's value (padding: callers mask it)."""
    hidden_btd, head = objective.batch_hidden_and_head(params, batch, model, rng, head=model_lib.Transformer.scalar_weights)
    values_bt = model_lib.scalar_values(hidden_btd, head)
    return jnp.take_along_axis(values_bt, last_trained_position(batch["weights"])[:, None], axis=1)[:, 0]


def last_trained_position(weights_bt: jax.Array) -> jax.Array:
    """int32 `[batch]`: the index of each row's last position with weight > 0 (0 for a row without one)."""
    length = weights_bt.shape[1]
    trained_bt = weights_bt > 0
    last_b = length - 1 - jnp.argmax(trained_bt[:, ::-1], axis=1)
    return jnp.where(jnp.any(trained_bt, axis=1), last_b, 0).astype(jnp.int32)


def bradley_terry_loss(score_b: jax.Array, weights_bt: jax.Array, *, center_coef: float = 0.0
                       ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The mean Bradley-Terry loss over the valid pairs (a pair is padding when its chosen row has no trained token)
    and the module docstring's metrics; `metrics["pairs"]` is the number of valid pairs.

    Args:
      score_b: fp32 `[2 * pairs]` scores, rows `2i` chosen and `2i + 1` rejected.
      weights_bt: `[2 * pairs, length]` loss weights of the rows (which pairs are padding).
      center_coef: weight of the `mean((r_c + r_r)^2)` term that keeps scores centred (TRL's).
    """
    score_p2 = score_b.reshape(-1, 2)
    valid_p = jnp.any(weights_bt.reshape(-1, 2, weights_bt.shape[1])[:, 0] > 0, axis=1)
    pairs = jnp.sum(valid_p.astype(jnp.float32))

    def mean(values_p):
        return jnp.sum(jnp.where(valid_p, values_p, 0.0)) / jnp.maximum(pairs, 1.0)

    margin_p = score_p2[:, 0] - score_p2[:, 1]
    loss = mean(-jax.nn.log_sigmoid(margin_p) + center_coef * jnp.square(score_p2[:, 0] + score_p2[:, 1]))
    scores_p2 = jax.lax.stop_gradient(score_p2)
    metrics = {
        "accuracy": mean((scores_p2[:, 0] > scores_p2[:, 1]).astype(jnp.float32)),
        "margin": mean(scores_p2[:, 0] - scores_p2[:, 1]),
        "mean_reward": mean(0.5 * (scores_p2[:, 0] + scores_p2[:, 1])),
        "pairs": pairs,
    }
    return loss, metrics
