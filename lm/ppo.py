"""PPO's per-token math (Schulman et al. 2017; for language models Ziegler et al. 2019, InstructGPT), as TRL's
`PPOTrainer` computes it: pure, jittable functions of `[batch, time]` fp32 arrays, and `ppo_loss`, the objective the
train step differentiates on a minibatch of a rollout; the loop that makes rollouts is `lm.rl`.

`mask_bt` is a float mask of the response tokens (1 on a token the policy sampled, 0 on prompt and padding); entries
outside it reach no mean, sum or gradient (they may be anything, even -inf or NaN: log-probabilities of padding), and
outputs are 0 there unless noted. Per rollout batch, with `logp` the sampling policy's log-probabilities, `ref` the reference's, `V` the value
head's predictions and `score_b` the reward model's (or a Python function's) score of each response:

    kl_t   = logp_t - ref_t                        (k1)  or  (r_t - 1) - log r_t,  r_t = exp(ref_t - logp_t)   (k3)
    reward = -kl_coef * kl_t  on every response token, + score at the row's last response token
    delta_t = reward_t + gamma V_{t+1} - V_t        (V after the row's last response token: 0)
    A_t    = delta_t + gamma lam A_{t+1}            (GAE, a reverse `lax.scan`);  R_t = A_t + V_t  (value targets)
    A      <- masked_whiten(A, mask)                (TRL whitens the advantages over the rollout batch)

then for `num_ppo_epochs` epochs over minibatches, with `rho_t = exp(logp_new_t - logp_t)`:

    policy loss = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))
    value loss  = 0.5 mean_t max((V'_t - R_t)^2, (clip(V'_t, V_t - eps_v, V_t + eps_v) - R_t)^2)
    loss = policy loss + vf_coef * value loss

and after each batch, optionally, the adaptive KL coefficient (`adaptive_kl_coef`). TRL's defaults: `kl_coef=0.05`,
`kl_estimator="k1"`, `cliprange=0.2`, `cliprange_value=0.2`, `vf_coef=0.1`, `gamma=1.0`, `lam=0.95`,
`num_ppo_epochs=4`, `whiten_rewards=False`; legacy TRL's adaptive controller: `init_kl_coef=0.2`, `target=6`,
`horizon=10000`. Means are masked means over all response tokens of the (mini)batch.

Metrics carry TRL's names (`policy/clipfrac`, `policy/approxkl`, `val/ratio`, `val/clipfrac`; TRL logs their
averages over minibatches and epochs with an `_avg` suffix). Axis letters: b rollout rows, t positions in a row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from jax import lax

from lm import loss as loss_lib
from lm import model as model_lib
from lm import objective
from lm import peft
from lm import reward

KL_ESTIMATORS = ("k1", "k3")  # TRL's `PPOConfig.kl_estimator` values (http://joschu.net/blog/kl-approx.html).

_F32 = jnp.float32


def _masked(x_bt, mask_bt):
    """fp32 `x_bt` with 0 outside the mask: where(), not a product, so an inf or NaN there cannot leak (0 * inf is
    NaN), neither in the value nor, through a product's backward pass, in a gradient."""
    return jnp.where(mask_bt > 0, jnp.asarray(x_bt, _F32), 0.0)


def masked_mean(x_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
    """fp32 scalar `sum(mask * x) / sum(mask)` over all axes; 0 for an empty mask (TRL's is NaN there)."""
    mask_bt = jnp.asarray(mask_bt, _F32)
    total = jnp.sum(mask_bt)
    return jnp.sum(mask_bt * _masked(x_bt, mask_bt)) / jnp.where(total > 0, total, 1.0)


def masked_whiten(x_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
    """TRL's `masked_whiten`: `(x - mean) / sqrt(var + 1e-8)` with the masked mean and the unbiased (Bessel-corrected)
    masked variance (what TRL does to the advantages; its optional whitening of rewards is not offered here).

    Every entry is transformed, inside the mask or not (as in TRL): zero the outside with `mask_bt` where it matters.
    With fewer than two masked tokens the biased variance is used (TRL raises or divides by zero).
    """
    x_bt, mask_bt = jnp.asarray(x_bt, _F32), jnp.asarray(mask_bt, _F32)
    mean = masked_mean(x_bt, mask_bt)
    count = jnp.sum(mask_bt)
    variance = masked_mean(jnp.square(x_bt - mean), mask_bt) * jnp.where(count > 1, count / (count - 1), 1.0)
    whitened_bt = (x_bt - mean) * lax.rsqrt(variance + 1e-8)
    return whitened_bt


def kl_per_token(log_prob_bt: jax.Array, ref_log_prob_bt: jax.Array, estimator: str = "k1") -> jax.Array:
    """fp32 `[b, t]` per-token estimate of KL(policy || reference) at the sampled tokens (TRL's `kl_estimator`).

    `k1 = log p - log p_ref` (unbiased, may be negative); `k3 = (r - 1) - log r` with `r = p_ref / p` (unbiased, lower
    variance, never negative). Elementwise: mask it (`token_rewards` does).
    """
    log_ratio_bt = jnp.asarray(ref_log_prob_bt, _F32) - jnp.asarray(log_prob_bt, _F32)  # log r.
    if estimator == "k1":
        return -log_ratio_bt
    if estimator == "k3":
        return jnp.expm1(log_ratio_bt) - log_ratio_bt  # expm1: exact near r = 1, where the policy starts.
    raise ValueError(f"kl_per_token: estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def token_rewards(score_b: jax.Array, kl_bt: jax.Array, mask_bt: jax.Array, kl_coef) -> jax.Array:
    """fp32 `[b, t]` per-token rewards: `-kl_coef * kl` on every response token, plus `score_b` at each row's last
    response token (the last position with `mask_bt > 0`; a row without one gets no score).

    TRL's trainer adds the score one position later, at the first padding slot after the EOS (huggingface/trl#3750,
    an index quirk; #5338 proposes the EOS). Here it lands on the last response token itself, as in
    lm-human-preferences and "The N Implementation Details of RLHF with PPO", so that it is inside the mask.
    `kl_coef` may be a traced scalar (the adaptive coefficient).
    """
    valid_bt = jnp.asarray(mask_bt) > 0
    last_b = reward.last_trained_position(valid_bt)  # Where a reward model reads its score, too.
    is_last_bt = (jnp.arange(valid_bt.shape[1])[None, :] == last_b[:, None]) & jnp.any(valid_bt, axis=1, keepdims=True)
    rewards_bt = -jnp.asarray(kl_coef, _F32) * _masked(kl_bt, mask_bt)
    return rewards_bt + jnp.where(is_last_bt, jnp.asarray(score_b, _F32)[:, None], 0.0)


def gae(rewards_bt: jax.Array, values_bt: jax.Array, mask_bt: jax.Array, gamma, lam) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation (Schulman et al. 2016) over each row's response tokens.

    `delta_t = r_t + gamma V_next - V_t`, `A_t = delta_t + gamma lam A_next`, where "next" is the row's next response
    token; after its last one `V_next = A_next = 0` (the episode ends: no bootstrap, as in TRL). Positions outside the
    mask are skipped, not counted as steps: a right-padded row is TRL's computation, and a mask with holes (a prompt
    or tool output between trained spans) chains the spans around them.

    Args:
      rewards_bt, values_bt: `[b, t]` per-token rewards (`token_rewards`) and the rollout's value predictions.
      mask_bt: `[b, t]` response mask. gamma, lam: discount and GAE lambda (floats or traced scalars).

    Returns:
      `(advantages_bt, returns_bt)`, fp32 `[b, t]`, 0 outside the mask; `returns = advantages + values` (the value
      head's targets). The advantages are not whitened (TRL whitens them next: `masked_whiten(advantages, mask)`).
    """
    valid_bt = jnp.asarray(mask_bt) > 0
    # Entries outside the mask may be garbage: the step below never lets them into the carry or an output.
    rewards_bt, values_bt = jnp.asarray(rewards_bt, _F32), jnp.asarray(values_bt, _F32)
    gamma, lam = jnp.asarray(gamma, _F32), jnp.asarray(lam, _F32)

    def step(carry, inputs):
        next_value_b, next_advantage_b = carry
        reward_b, value_b, valid_b = inputs
        advantage_b = reward_b + gamma * next_value_b - value_b + gamma * lam * next_advantage_b
        # A masked position passes the carry through unchanged (it is not a time step) and has no advantage.
        carry = (jnp.where(valid_b, value_b, next_value_b), jnp.where(valid_b, advantage_b, next_advantage_b))
        return carry, jnp.where(valid_b, advantage_b, 0.0)

    zeros_b = jnp.zeros(valid_bt.shape[:1], _F32)
    # Scan over time (time-major inputs), last position first; the outputs come back in the original order.
    _, advantages_tb = lax.scan(step, (zeros_b, zeros_b), (rewards_bt.T, values_bt.T, valid_bt.T), reverse=True)
    advantages_bt = advantages_tb.T
    return advantages_bt, jnp.where(valid_bt, advantages_bt + values_bt, 0.0)


def policy_loss(new_log_prob_bt: jax.Array, old_log_prob_bt: jax.Array, advantages_bt: jax.Array,
                mask_bt: jax.Array, clip_range: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO's clipped surrogate, TRL's `pg_loss`: `masked_mean(max(-A rho, -A clip(rho, 1 - eps, 1 + eps)))` with
    `rho = exp(new_log_prob - old_log_prob)` (the max of the negated objectives is the min of the objectives).

    Args:
      new_log_prob_bt: `[b, t]` the policy being trained (differentiable); old_log_prob_bt: `[b, t]` the rollout's.
      advantages_bt: `[b, t]` (whitened) advantages; mask_bt: `[b, t]` response mask; clip_range: eps.

    Returns:
      `(loss, metrics)`, fp32 scalars. metrics (no gradient): `policy/clipfrac` (fraction of tokens where the clipped
      term is the larger, TRL's `pg_losses2 > pg_losses`), `policy/approxkl` (`0.5 mean((new - old)^2)`), `val/ratio`
      (mean rho). All masked means: TRL averages the last two over padding too, where its ratio is 1.
    """
    log_ratio_bt = _masked(jnp.asarray(new_log_prob_bt, _F32) - jnp.asarray(old_log_prob_bt, _F32), mask_bt)
    ratio_bt = jnp.exp(log_ratio_bt)
    advantages_bt = jnp.asarray(advantages_bt, _F32)  # Not differentiated: masked_mean alone keeps padding out.
    unclipped_bt = -advantages_bt * ratio_bt
    clipped_bt = -advantages_bt * jnp.clip(ratio_bt, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(jnp.maximum(unclipped_bt, clipped_bt), mask_bt)
    metrics = {
        "policy/clipfrac": masked_mean((clipped_bt > unclipped_bt).astype(_F32), mask_bt),
        "policy/approxkl": 0.5 * masked_mean(jnp.square(log_ratio_bt), mask_bt),
        "val/ratio": masked_mean(ratio_bt, mask_bt),
    }
    return loss, jax.tree.map(lax.stop_gradient, metrics)


def value_loss(new_values_bt: jax.Array, old_values_bt: jax.Array, returns_bt: jax.Array, mask_bt: jax.Array,
               clip_range_value: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The clipped value loss, TRL's `vf_loss`: `0.5 masked_mean(max((V' - R)^2, (clip(V', V - eps, V + eps) - R)^2))`
    with `V'` the predictions being trained, `V` the rollout's and `R` the returns (`gae`).

    Returns:
      `(loss, metrics)`, fp32 scalars; metrics (no gradient): `val/clipfrac`, the fraction of tokens where the clipped
      error is the larger (TRL's `vf_losses2 > vf_losses1`).
    """
    new_values_bt = _masked(new_values_bt, mask_bt)  # The differentiated input; masked_mean keeps out the others.
    old_values_bt, returns_bt = jnp.asarray(old_values_bt, _F32), jnp.asarray(returns_bt, _F32)
    clipped_values_bt = jnp.clip(new_values_bt, old_values_bt - clip_range_value, old_values_bt + clip_range_value)
    unclipped_bt = jnp.square(new_values_bt - returns_bt)
    clipped_bt = jnp.square(clipped_values_bt - returns_bt)
    loss = 0.5 * masked_mean(jnp.maximum(unclipped_bt, clipped_bt), mask_bt)
    return loss, {"val/clipfrac": lax.stop_gradient(masked_mean((clipped_bt > unclipped_bt).astype(_F32), mask_bt))}


def adaptive_kl_coef(coef, kl, target, horizon, steps) -> jax.Array:
    """The next KL coefficient of Ziegler et al. (2019)'s proportional controller (legacy TRL's
    `AdaptiveKLController.update`): `coef * (1 + clip(kl / target - 1, -0.2, 0.2) * steps / horizon)`.

    Args:
      coef: the current coefficient. kl: the batch's KL in the units of `target`: TRL's `objective/kl`, the mean over
        rows of each row's summed per-token KL, `jnp.mean(jnp.sum(kl_bt * mask_bt, axis=1))`.
      target: the KL aimed at (legacy TRL: 6). horizon: the controller's time scale (10000): at the largest error,
        `horizon` episodes change the coefficient by a factor of about e^0.2 (or e^-0.2). steps: the episodes
        (rollout rows) since the last update (TRL: the batch size over all processes).

    A fixed coefficient is the same loop without this call. Pure and traceable: the coefficient is the loop's state.
    """
    error = jnp.clip(jnp.asarray(kl, _F32) / target - 1.0, -0.2, 0.2)
    return jnp.asarray(coef, _F32) * (1.0 + error * steps / horizon)


# The rollout arrays a PPO minibatch carries beside `inputs`, `targets` and `weights` (the response mask), all fp32
# `[b, t]` aligned with the targets (`lm.rl`).
ROLLOUT_FEATURES = ("old_log_probs", "old_values", "advantages", "returns")


def policy_log_probs_and_values(params, batch: dict[str, jax.Array], model: model_lib.Transformer,
                                config: ml_collections.ConfigDict, rng: jax.Array | None = None,
                                entropy: bool = False):
    """`(log_prob_bt, value_bt, entropy_bt)`, fp32 `[b, t]`, of a policy with a value head on rows of
    `inputs`/`targets`: the log-probability of each target at `config.rl.temperature` (the distribution the rollout
    sampled from), the value head at each position, and with `entropy` the entropy (a metric: no gradient; else
    None, and no pass over the vocabulary for it). All blockwise over the vocabulary (`lm.loss`)."""
    head = lambda module: (module.output_kernel(), module.scalar_weights())
    hidden_btd, (kernel_dv, scalar_head) = objective.batch_hidden_and_head(params, batch, model, rng, head=head)
    log_prob_bt = tempered_log_probs(hidden_btd, kernel_dv, batch["targets"], config)
    entropy_bt = None
    if entropy:
        entropy_bt = loss_lib.token_entropies(_tempered(hidden_btd, config), kernel_dv,
                                              chunk_size=config.loss.chunk_size,
                                              logit_softcap=config.model.logit_softcap)
    return log_prob_bt, model_lib.scalar_values(hidden_btd, scalar_head), entropy_bt


def tempered_log_probs(hidden_btd: jax.Array, kernel_dv: jax.Array, targets_bt: jax.Array,
                       config: ml_collections.ConfigDict) -> jax.Array:
    """fp32 `[b, t]` log-probabilities of the targets at `config.rl.temperature`, blockwise (`lm.loss`)."""
    log_prob_bt, _ = loss_lib.token_log_probs(_tempered(hidden_btd, config), kernel_dv, targets_bt,
                                              chunk_size=config.loss.chunk_size,
                                              logit_softcap=config.model.logit_softcap)
    return log_prob_bt


def _tempered(hidden_btd: jax.Array, config: ml_collections.ConfigDict) -> jax.Array:
    # Logits are linear in the hidden state: dividing it divides them (with a soft-cap they are not: `lm.config`
    # allows temperature 1 only then).
    return hidden_btd / jnp.asarray(config.rl.temperature, hidden_btd.dtype)


def ppo_loss(trainable, frozen, batch: dict[str, jax.Array], model: model_lib.Transformer,
             config: ml_collections.ConfigDict, rng: jax.Array | None = None
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`policy loss + config.rl.vf_coef * value loss` of the policy `peft.combine(frozen, trainable)` on a minibatch
    (`ROLLOUT_FEATURES` beside the rows): `(loss, aux)`, aux the metrics `policy_loss`, `value_loss`, TRL's `policy/clipfrac`, `policy/approxkl`, `val/ratio`, `val/clipfrac`, and `weight_sum` (response tokens: the
    losses are means over them, so micro-batches accumulate exactly)."""
    settings = config.rl
    log_prob_bt, value_bt, _ = policy_log_probs_and_values(peft.combine(frozen, trainable), batch, model, config,
                                                           rng)
    mask_bt = batch["weights"]
    pg_loss, pg_metrics = policy_loss(log_prob_bt, batch["old_log_probs"], batch["advantages"], mask_bt,
                                      settings.clip_range)
    vf_loss, vf_metrics = value_loss(value_bt, batch["old_values"], batch["returns"], mask_bt,
                                     settings.clip_range_value)
    metrics = {"policy_loss": pg_loss, "value_loss": vf_loss, **pg_metrics, **vf_metrics, "weight_sum": jnp.sum(jnp.asarray(mask_bt, _F32))}
    return pg_loss + settings.vf_coef * vf_loss, metrics
