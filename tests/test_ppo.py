"""lm.ppo's per-token PPO math against values written out by hand (GAE, the clipped surrogate and value losses, the KL
estimators, the reward layout, the adaptive KL coefficient), and lm.loss.token_entropies against dense entropies."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import loss as loss_lib
from lm import ppo

NAN, INF = float("nan"), float("inf")

# Two rows of four positions; row 0 has three response tokens, row 1 two, then padding. Padding holds garbage (NaN
# rewards, a large value) that must never be read.
MASK = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.float32)
REWARDS = np.array([[0.1, -0.2, 1.0, NAN], [0.0, 2.0, NAN, NAN]], np.float32)
VALUES = np.array([[0.5, 0.4, 0.3, 99.0], [1.0, 0.5, 99.0, 99.0]], np.float32)
MASK_2x4 = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], np.float32)


def close(actual, expected, atol=1e-6):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected, np.float32), rtol=1e-6, atol=atol)


# ---------------------------------------------------------------------------------------------------------------------
# GAE


def test_gae_gamma_1_lambda_095_by_hand():
    # delta_t = r_t + gamma V_{t+1} - V_t (V after the last token: 0), A_t = delta_t + gamma lam A_{t+1}; gamma = 1.
    # Row 0: delta_2 = 1.0 - 0.3 = 0.7;               A_2 = 0.7
    #        delta_1 = -0.2 + 0.3 - 0.4 = -0.3;       A_1 = -0.3 + 0.95 * 0.7   = 0.365
    #        delta_0 = 0.1 + 0.4 - 0.5 = 0.0;         A_0 = 0.0 + 0.95 * 0.365  = 0.34675
    # Row 1: delta_1 = 2.0 - 0.5 = 1.5;               A_1 = 1.5
    #        delta_0 = 0.0 + 0.5 - 1.0 = -0.5;        A_0 = -0.5 + 0.95 * 1.5   = 0.925
    # Returns = A + V on the response tokens, 0 elsewhere.
    advantages, returns = jax.jit(ppo.gae)(REWARDS, VALUES, MASK, 1.0, 0.95)
    close(advantages, [[0.34675, 0.365, 0.7, 0.0], [0.925, 1.5, 0.0, 0.0]])
    close(returns, [[0.84675, 0.765, 1.0, 0.0], [1.925, 2.0, 0.0, 0.0]])


def test_gae_gamma_09_lambda_1_by_hand():
    # lam = 1: A_t is the discounted return minus V_t, and the returns are the discounted returns G_t.
    # Row 0: G_2 = 1.0;  G_1 = -0.2 + 0.9 * 1.0 = 0.7;  G_0 = 0.1 + 0.9 * 0.7 = 0.73
    #        A = G - V = [0.73 - 0.5, 0.7 - 0.4, 1.0 - 0.3] = [0.23, 0.3, 0.7]
    #        (recursively: delta_0 = 0.1 + 0.9 * 0.4 - 0.5 = -0.04, A_0 = -0.04 + 0.9 * 0.3 = 0.23)
    # Row 1: G_1 = 2.0;  G_0 = 0.0 + 0.9 * 2.0 = 1.8;  A = [1.8 - 1.0, 2.0 - 0.5] = [0.8, 1.5]
    advantages, returns = jax.jit(ppo.gae)(REWARDS, VALUES, MASK, 0.9, 1.0)
    close(advantages, [[0.23, 0.3, 0.7, 0.0], [0.8, 1.5, 0.0, 0.0]])
    close(returns, [[0.73, 0.7, 1.0, 0.0], [1.8, 2.0, 0.0, 0.0]])


def test_gae_skips_positions_outside_the_mask():
    # A prompt before the response (mask 0 at t = 0) changes nothing; a hole between two trained tokens is not a time
    # step: with gamma = 0.9, lam = 1, rewards [1, _, 2] and values [0.5, _, 0.2] on mask [1, 0, 1]:
    # A_2 = 2 - 0.2 = 1.8;  A_0 = 1 + 0.9 * 0.2 - 0.5 + 0.9 * 1.8 = 2.3  (= G_0 - V_0 = 1 + 0.9 * 2 - 0.5).
    mask = np.array([[0, 1, 1, 1], [1, 0, 1, 0]], np.float32)
    rewards = np.array([[NAN, 0.1, -0.2, 1.0], [1.0, NAN, 2.0, NAN]], np.float32)
    values = np.array([[-INF, 0.5, 0.4, 0.3], [0.5, 99.0, 0.2, 99.0]], np.float32)
    advantages, returns = ppo.gae(rewards, values, mask, 0.9, 1.0)
    close(advantages, [[0.0, 0.23, 0.3, 0.7], [2.3, 0.0, 1.8, 0.0]])
    close(returns, [[0.0, 0.73, 0.7, 1.0], [2.8, 0.0, 2.0, 0.0]])


def test_gae_equals_the_sum_of_discounted_td_errors():
    # The non-recursive form A_t = sum_l (gamma lam)^l delta_{t+l} on random right-padded rows.
    rng = np.random.default_rng(0)
    lengths = np.array([7, 3, 1, 5])
    mask = (np.arange(7)[None, :] < lengths[:, None]).astype(np.float32)
    rewards, values = rng.normal(size=(4, 7)).astype(np.float32), rng.normal(size=(4, 7)).astype(np.float32)
    gamma, lam = 0.97, 0.9
    expected = np.zeros((4, 7))
    for b, length in enumerate(lengths):
        next_values = np.append(values[b, 1:length], 0.0)
        deltas = rewards[b, :length] + gamma * next_values - values[b, :length]
        for t in range(length):
            expected[b, t] = sum((gamma * lam) ** l * deltas[t + l] for l in range(length - t))
    advantages, _ = ppo.gae(rewards, values, mask, gamma, lam)
    close(advantages, expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# The clipped surrogate and the value loss


def test_policy_loss_by_hand():
    # eps = 0.2. Per token: ratio rho, advantage A, -A rho, -A clip(rho, 0.8, 1.2), the max, clipped active?
    #   rho 1.5, A +1: -1.5, -1.2 -> -1.2  clipped (an increase past 1 + eps earns nothing more)
    #   rho 1.5, A -1:  1.5,  1.2 ->  1.5  unclipped (a bad action made likelier is always penalised)
    #   rho 0.5, A +2: -1.0, -1.6 -> -1.0  unclipped
    #   rho 0.5, A -2:  1.0,  1.6 ->  1.6  clipped
    #   rho 1.1, A +1: -1.1, -1.1 -> -1.1  inside the range: not clipped
    #   rho 0.9, A -1:  0.9,  0.9 ->  0.9  inside
    # loss = (-1.2 + 1.5 - 1.0 + 1.6 - 1.1 + 0.9) / 6 = 0.7 / 6; clipfrac = 2 / 6; mean ratio = 6.0 / 6 = 1.
    ratios = np.array([[1.5, 1.5, 0.5, 0.5], [1.1, 0.9, 1.0, 1.0]])
    old = np.array([[-1.0, -2.0, -0.5, -3.0], [-1.2, -0.7, -INF, -INF]], np.float32)  # Padding: -inf - -inf = NaN.
    new = np.where(MASK_2x4 > 0, old + np.log(ratios), -INF).astype(np.float32)
    advantages = np.array([[1.0, -1.0, 2.0, -2.0], [1.0, -1.0, NAN, NAN]], np.float32)
    loss, metrics = jax.jit(ppo.policy_loss, static_argnums=4)(new, old, advantages, MASK_2x4, 0.2)
    close(loss, 0.7 / 6)
    close(metrics["policy/clipfrac"], 2 / 6)
    close(metrics["val/ratio"], 1.0)
    close(metrics["policy/approxkl"],
          0.5 * (2 * math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2 + math.log(1.1) ** 2 + math.log(0.9) ** 2) / 6)

    # d loss / d new_log_prob = -A rho / 6 where the unclipped term is the max, 0 where the clipped (flat) one is;
    # 0 (not NaN) on padding.
    grad = jax.grad(lambda n: ppo.policy_loss(n, old, advantages, MASK_2x4, 0.2)[0])(new)
    close(grad, [[0.0, 1.5 / 6, -1.0 / 6, 0.0], [-1.1 / 6, 0.9 / 6, 0.0, 0.0]])


def test_value_loss_by_hand():
    # eps_v = 0.2. Per token: old V, new V', return R; (V' - R)^2, (clip(V', V - 0.2, V + 0.2) - R)^2, the max:
    #   V 0, V' 0.5, R 1: 0.25, (0.2 - 1)^2 = 0.64 -> 0.64  clipped (the clipped prediction is further from R)
    #   V 0, V' 0.5, R 0: 0.25, (0.2 - 0)^2 = 0.04 -> 0.25
    #   V 1, V' 1.1, R 2: 0.81, 0.81 (inside)         -> 0.81
    #   V 1, V' 0.5, R 0: 0.25, (0.8 - 0)^2 = 0.64 -> 0.64  clipped
    # loss = 0.5 * (0.64 + 0.25 + 0.81 + 0.64) / 4 = 0.2925; clipfrac = 2 / 4.
    old = np.array([[0.0, 0.0, 1.0, 1.0, NAN]], np.float32)
    new = np.array([[0.5, 0.5, 1.1, 0.5, INF]], np.float32)
    returns = np.array([[1.0, 0.0, 2.0, 0.0, NAN]], np.float32)
    mask = np.array([[1, 1, 1, 1, 0]], np.float32)
    loss, metrics = jax.jit(ppo.value_loss, static_argnums=4)(new, old, returns, mask, 0.2)
    close(loss, 0.2925)
    close(metrics["val/clipfrac"], 0.5)
    # Gradient 0.5 * 2 (V' - R) / 4 where the unclipped error is the max (or inside the range), 0 where the clipped
    # prediction (a constant at its bound) is.
    grad = jax.grad(lambda v: ppo.value_loss(v, old, returns, mask, 0.2)[0])(new)
    close(grad, [[0.0, 0.5 / 4, -0.9 / 4, 0.0, 0.0]])


# ---------------------------------------------------------------------------------------------------------------------
# KL, rewards, whitening, the KL coefficient


def test_kl_estimators_by_hand():
    # log r = ref - logp = [-0.5, 1.0, 0.0]. k1 = -log r; k3 = (e^{log r} - 1) - log r.
    log_prob = np.array([[-1.0, -2.0, -0.3]], np.float32)
    ref = np.array([[-1.5, -1.0, -0.3]], np.float32)
    close(ppo.kl_per_token(log_prob, ref, "k1"), [[0.5, -1.0, 0.0]])
    close(ppo.kl_per_token(log_prob, ref, "k3"), [[math.exp(-0.5) - 1 + 0.5, math.e - 1 - 1, 0.0]])
    with pytest.raises(ValueError, match="k1"):
        ppo.kl_per_token(log_prob, ref, "k2")


def test_token_rewards_score_at_the_last_response_token():
    # kl_coef 0.1: -0.1 * kl on response tokens; the score added at the last one. Row 1's response starts after a
    # prompt token; row 2 has no response token (no score anywhere).
    kl = np.array([[0.1, 0.2, 0.3, NAN], [9.0, 0.5, -0.5, INF], [1.0, 1.0, 1.0, 1.0]], np.float32)
    mask = np.array([[1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]], np.float32)
    score = np.array([2.0, -1.0, 5.0], np.float32)
    rewards = jax.jit(ppo.token_rewards)(score, kl, mask, jnp.float32(0.1))  # A traced coefficient.
    close(rewards, [[-0.01, -0.02, -0.03 + 2.0, 0.0], [0.0, -0.05, 0.05 - 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])


def test_masked_mean_and_whiten_by_hand():
    x = np.array([[1.0, 3.0], [5.0, NAN]], np.float32)
    mask = np.array([[1, 1], [1, 0]], np.float32)
    close(ppo.masked_mean(x, mask), 3.0)
    close(ppo.masked_mean(x, np.array([[0.5, 1], [0, 0]], np.float32)), (0.5 * 1 + 3) / 1.5)  # Weights.
    close(ppo.masked_mean(x, np.zeros_like(mask)), 0.0)  # Empty: 0, not NaN.
    # mean 3, unbiased variance ((1-3)^2 + 0 + (5-3)^2) / (3 - 1) = 4, std 2: [-1, 0, 1] (the 1e-8 is negligible).
    values = np.array([[1.0, 3.0], [5.0, 100.0]], np.float32)
    close(ppo.masked_whiten(values, mask)[mask > 0], [-1.0, 0.0, 1.0])


def test_adaptive_kl_coef_by_hand():
    # coef * (1 + clip(kl / target - 1, -0.2, 0.2) * steps / horizon); target 6, horizon 10000, steps 256.
    update = jax.jit(ppo.adaptive_kl_coef)
    close(update(0.2, 9.0, 6.0, 10000, 256), 0.2 * (1 + 0.2 * 0.0256))  # error 0.5, clipped to 0.2
    close(update(0.2, 6.6, 6.0, 10000, 256), 0.2 * (1 + 0.1 * 0.0256))  # error 0.1
    close(update(0.2, 0.0, 6.0, 10000, 256), 0.2 * (1 - 0.2 * 0.0256))  # error -1, clipped to -0.2
    close(update(0.2, 6.0, 6.0, 10000, 256), 0.2)  # on target


def test_the_rollout_math_runs_under_jit_with_garbage_padding():
    # The chain an update runs, jitted: no NaN from -inf / NaN padding in values or gradients.
    old = np.array([[-1.0, -2.0, -0.5, -INF], [-1.2, -0.7, -INF, -INF]], np.float32)
    ref = np.array([[-1.1, -1.5, -0.5, NAN], [-1.0, -0.9, NAN, NAN]], np.float32)

    @jax.jit
    def step(new, kl_coef):
        kl = ppo.kl_per_token(old, ref, "k3")
        rewards = ppo.token_rewards(jnp.array([1.0, -1.0]), kl, MASK, kl_coef)
        advantages, returns = ppo.gae(rewards, VALUES, MASK, 1.0, 0.95)
        advantages = ppo.masked_whiten(advantages, MASK) * MASK
        pg, _ = ppo.policy_loss(new, old, advantages, MASK, 0.2)
        vf, _ = ppo.value_loss(VALUES + 0.1, VALUES, returns, MASK, 0.2)
        return pg + 0.1 * vf

    loss, grad = jax.value_and_grad(step)(jnp.asarray(old + 0.05), jnp.float32(0.05))
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    assert np.all(grad[MASK == 0] == 0)


# ---------------------------------------------------------------------------------------------------------------------
# lm.loss.token_entropies


def dense_entropy(hidden, kernel, logit_softcap=None):
    logits = jnp.einsum("...d,dv->...v", hidden, kernel, precision=jax.lax.Precision.HIGHEST)
    if logit_softcap is not None:
        logits = logit_softcap * jnp.tanh(logits / logit_softcap)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)


@pytest.mark.parametrize("logit_softcap", [None, 2.0])
@pytest.mark.parametrize("chunk_size", [5, 16, 64])  # V = 37: 8 blocks, 3 (head, one scanned, last), 1.
def test_token_entropies_match_dense(chunk_size, logit_softcap):
    k1, k2 = jax.random.split(jax.random.key(0))
    # Rows from near-uniform to peaked: hidden scaled per row.
    hidden = jax.random.normal(k1, (2, 3, 16)) * jnp.array([0.1, 1.0, 3.0])[None, :, None]
    kernel = jax.random.normal(k2, (16, 37))
    expected = dense_entropy(hidden, kernel, logit_softcap)
    actual = jax.jit(lambda h, k: loss_lib.token_entropies(h, k, chunk_size=chunk_size,
                                                           logit_softcap=logit_softcap))(hidden, kernel)
    assert actual.shape == (2, 3) and actual.dtype == jnp.float32
    close(actual, expected, atol=2e-5)
    if logit_softcap is None:  # The example spans peaked to near-uniform rows (log 37 = 3.61).
        assert float(jnp.min(expected)) < 0.01 and float(jnp.max(expected)) > 3.4


def test_token_entropies_by_hand_and_no_gradient():
    # Equal logits: H = log V. Large logits, one dominant: 800 everywhere but 900 in column 30, in the last of the
    # five blocks (the running max grows there; exp(800) would overflow uncentred): p = e^-100 elsewhere, H ~ 0.
    hidden = jnp.ones((1, 4))
    close(loss_lib.token_entropies(hidden, jnp.zeros((4, 37)), chunk_size=8), [math.log(37)])
    kernel = jnp.zeros((4, 37)).at[:, 30].set(25.0) + 200.0
    close(loss_lib.token_entropies(hidden, kernel, chunk_size=8), [0.0])
    # A metric: no gradient (on random logits, where the entropy's true gradient is not 0).
    kernel = jax.random.normal(jax.random.key(1), (4, 37))
    grads = jax.grad(lambda h, k: jnp.sum(loss_lib.token_entropies(h, k, chunk_size=8)), argnums=(0, 1))(
        hidden, kernel)
    assert all(not np.any(g) for g in grads)
    assert np.any(jax.grad(lambda h: jnp.sum(dense_entropy(h, kernel)))(hidden))  # The check can fail.
