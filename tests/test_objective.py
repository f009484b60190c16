"""One distribution everywhere: the training objective, per-token losses, the eval step and decoding all see the same
(soft-capped) logits."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import config as lm_config
from lm import evaluate
from lm import kv_cache
from lm import model as model_lib
from lm import objective
from lm import sharding

LENGTH = 24


def setup(logit_softcap):
    config = lm_config.load("configs/tiny.py", **{
        "model.num_layers": 2, "model.d_model": 64, "model.num_heads": 4, "model.num_kv_heads": 2,
        "model.mlp_dim": 128, "model.vocab_size": 256, "model.init_std": 0.2, "model.logit_softcap": logit_softcap,
        "loss.chunk_size": 96})  # Three vocabulary blocks.
    model = model_lib.build(config)
    params = nn.unbox(model_lib.init(model, jax.random.key(3)))
    tokens = np.random.default_rng(0).integers(0, 256, (1, LENGTH + 1)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((1, LENGTH), np.float32)}
    return config, model, params, tokens, batch


@pytest.mark.parametrize("logit_softcap", [None, 1.0])
def test_training_loss_token_losses_and_eval_step_agree(logit_softcap):
    config, model, params, tokens, batch = setup(logit_softcap)
    _, aux = jax.jit(lambda p, b: objective.lm_loss(p, b, model, config))(params, batch)
    per_token = evaluate.token_losses(config, params, tokens[0])
    mesh = sharding.default_mesh(config, jax.devices()[:1])
    sums = evaluate.make_eval_step(config, model, sharding.model_shardings(config, mesh, model=model))(params, batch)
    np.testing.assert_allclose(float(aux["nll"]), per_token.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(sums["nll_sum"] / sums["weight_sum"]), per_token.mean(), rtol=1e-5)


def test_the_softcap_changes_the_distribution_the_tests_above_compare():
    capped, uncapped = (evaluate.token_losses(c, p, t[0]) for c, _, p, t, _ in (setup(1.0), setup(None)))
    assert abs(capped.mean() - uncapped.mean()) > 0.1


def test_decoding_draws_from_the_capped_logits():
    config, model, params, tokens, _ = setup(1.0)
    cache = kv_cache.KVCache.zeros(model.cfg, jnp.zeros((1,), jnp.int32), LENGTH)
    logits_1v, _ = model.apply({"params": params}, tokens[:, :LENGTH], cache, method=model.decode)
    _, raw_model, raw_params, _, _ = setup(None)
    hidden_1td = raw_model.apply({"params": raw_params}, tokens[:, :LENGTH])
    raw_1v = raw_model.apply({"params": raw_params}, hidden_1td[:, -1], method=raw_model.logits)
    assert float(jnp.abs(raw_1v).max()) > 1.5, "the raw logits exceed the cap, so capping matters"
    np.testing.assert_allclose(np.asarray(logits_1v), np.tanh(np.asarray(raw_1v)), rtol=1e-5, atol=1e-6)
