"""The optimizer (lm/optim.py): the weight-decay mask on real model parameter trees, that the mask takes effect in
an AdamW update, and the learning-rate schedule's values against its closed form."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lm import config as lm_config
from lm import model as model_lib
from lm import optim

# The projection kernels of one (scanned) layer, SwiGLU MLP: every one of them must decay.
LAYER_KERNELS = {
    "layers/attention/query/kernel", "layers/attention/key/kernel", "layers/attention/value/kernel",
    "layers/attention/out/kernel", "layers/mlp/gate/kernel", "layers/mlp/up/kernel", "layers/mlp/down/kernel",
}


# Model variants of configs/tiny.py whose parameter trees the mask is checked on. GPT-2-like: learned positions,
# LayerNorm (scale and bias) and biases in every projection; untied so the head is there too.
UNTIED = {"model.tie_embeddings": False}
TIED = {"model.tie_embeddings": True}
GPT2_LIKE = {"model.tie_embeddings": False, "model.position_embedding": "learned", "model.norm": "layernorm",
             "model.qkv_bias": True, "model.attention_out_bias": True, "model.mlp_bias": True}


def tiny(**overrides):
    return lm_config.load("configs/tiny.py", **overrides)


@functools.cache
def _real_params(overrides):
    return nn.unbox(model_lib.init(model_lib.build(tiny(**dict(overrides))), jax.random.key(0)))


def real_params(overrides):
    """The model's initial parameters (plain arrays) for configs/tiny.py with `overrides`; each model variant is
    initialised once per test session (an init takes seconds on 2 CPU cores)."""
    return _real_params(tuple(sorted(overrides.items())))


def by_path(tree):
    """{"a/b/c": leaf} for every leaf of a nested dict."""
    return {"/".join(str(k.key) for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def decayed_paths(params, decay_embeddings):
    mask = by_path(optim.weight_decay_mask(params, decay_embeddings))
    assert set(mask) == set(by_path(params))  # One bool per parameter leaf.
    assert all(isinstance(v, bool) for v in mask.values())
    decayed = {path for path, decays in mask.items() if decays}
    # Every projection kernel under `layers` is there and decays, whatever the variant.
    assert {path for path in mask if path.startswith("layers/") and path.endswith("/kernel")} == LAYER_KERNELS
    assert LAYER_KERNELS <= decayed
    return decayed, set(mask)


def test_untied_head_decays_lm_head_and_kernels_but_not_embedding_or_norm_scales():
    decayed, paths = decayed_paths(real_params(UNTIED), decay_embeddings=False)
    assert "lm_head" in paths and "embed/embedding" in paths
    assert decayed == LAYER_KERNELS | {"lm_head"}
    assert {"final_norm/scale", "layers/attention_norm/scale", "layers/mlp_norm/scale"} <= paths - decayed


def test_untied_decay_embeddings_adds_exactly_the_token_embedding():
    decayed, _ = decayed_paths(real_params(UNTIED), decay_embeddings=True)
    assert decayed == LAYER_KERNELS | {"lm_head", "embed/embedding"}


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_tied_head_has_no_lm_head_and_decays_the_embedding_only_when_asked(decay_embeddings):
    params = real_params(TIED)
    decayed, paths = decayed_paths(params, decay_embeddings)
    assert not any("lm_head" in path for path in paths)
    assert ("embed/embedding" in decayed) == decay_embeddings
    assert decayed == LAYER_KERNELS | ({"embed/embedding"} if decay_embeddings else set())


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_learned_position_table_is_treated_as_an_embedding(decay_embeddings):
    decayed, paths = decayed_paths(real_params(GPT2_LIKE), decay_embeddings)
    assert "position_table" in paths
    assert ("position_table" in decayed) == decay_embeddings == ("embed/embedding" in decayed)
    embeddings = {"embed/embedding", "position_table"} if decay_embeddings else set()
    assert decayed == LAYER_KERNELS | {"lm_head"} | embeddings


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_biases_and_layernorm_scales_and_biases_never_decay(decay_embeddings):
    decayed, paths = decayed_paths(real_params(GPT2_LIKE), decay_embeddings)
    projection_biases = {path.replace("/kernel", "/bias") for path in LAYER_KERNELS}
    norms = {f"{norm}/{name}" for norm in ("final_norm", "layers/attention_norm", "layers/mlp_norm")
             for name in ("scale", "bias")}
    assert projection_biases | norms <= paths  # The config really built them.
    assert not decayed & (projection_biases | norms)
    assert all(not path.endswith(("/bias", "/scale")) for path in decayed)
    embeddings = {"embed/embedding", "position_table"} if decay_embeddings else set()
    assert decayed == LAYER_KERNELS | {"lm_head"} | embeddings


def one_update_with_zero_gradients(config, params):
    """`params` after one step of `make_optimizer(config)` with all-zero gradients (one compiled step)."""
    opt = optim.make_optimizer(config)

    @jax.jit
    def step(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        updates, _ = opt.update(zeros, opt.init(params), params)
        return optax.apply_updates(params, updates)

    return params, step(params)


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_adamw_step_with_zero_gradients_shrinks_exactly_the_decayed_leaves(decay_embeddings):
    # warmup 0: the step-0 learning rate is the peak (with warmup it would be 0 and nothing would move). Zero
    # gradients keep Adam's moments at 0, so the update is -lr * weight_decay * param on decayed leaves and exactly 0
    # elsewhere: new = (1 - 0.1 * 0.1) * param = 0.99 * param.
    lr, weight_decay = 0.1, 0.1
    config = tiny(**GPT2_LIKE, **{"optim.optimizer": "adamw", "optim.learning_rate": lr, "optim.warmup_steps": 0,
                                  "optim.weight_decay": weight_decay, "optim.decay_embeddings": decay_embeddings})
    assert config.optim.grad_clip_norm > 0  # The clipping in front of AdamW is part of what is run.
    assert float(optim.learning_rate_schedule(config)(0)) == pytest.approx(lr, rel=1e-6)
    params, new_params = one_update_with_zero_gradients(config, real_params(GPT2_LIKE))
    mask = by_path(optim.weight_decay_mask(params, decay_embeddings))
    before, after = by_path(params), by_path(new_params)
    assert set(before) == set(after) == set(mask)
    for path, decays in mask.items():
        old, new = np.asarray(before[path]), np.asarray(after[path])
        if decays:
            assert not np.array_equal(new, old), path
            np.testing.assert_allclose(new, (1 - lr * weight_decay) * old, rtol=1e-6, err_msg=path)
        else:
            np.testing.assert_array_equal(new, old, err_msg=path)
    # The leaves the mask describes: the head and kernels move, norms and biases never, embeddings on request.
    assert mask["lm_head"] and mask["layers/mlp/down/kernel"]
    assert not mask["final_norm/scale"] and not mask["layers/attention/query/bias"]
    assert mask["embed/embedding"] == mask["position_table"] == decay_embeddings


# The learning-rate schedule. Closed forms (config.optim: peak lr, warmup w, floor ratio a; T = total_steps):
#   warmup:        lr(s) = peak * s / w                                    for s < w
#   cosine decay:  lr(w + t) = peak * (a + (1 - a) * (1 + cos(pi * t / (T - w))) / 2)
#   linear decay:  lr(w + t) = peak * (1 - (1 - a) * t / (T - w))
#   constant:      lr(w + t) = peak
PEAK, WARMUP, TOTAL, END_RATIO = 2e-3, 100, 1100, 0.1


def schedule(kind, warmup=WARMUP, total=TOTAL):
    config = tiny(**{"optim.schedule": kind, "optim.learning_rate": PEAK, "optim.warmup_steps": warmup,
                     "optim.end_lr_ratio": END_RATIO, "total_steps": total})
    fn = optim.learning_rate_schedule(config)
    return lambda step: float(fn(step))


@pytest.mark.parametrize("kind,end", [("cosine", END_RATIO * PEAK), ("linear", END_RATIO * PEAK),
                                      ("constant", PEAK)], ids=["cosine", "linear", "constant"])
def test_schedule_is_zero_at_start_peak_after_warmup_and_floor_at_total_steps(kind, end):
    lr = schedule(kind)
    assert lr(0) == 0.0
    np.testing.assert_allclose(lr(WARMUP // 4), PEAK / 4, rtol=1e-6)  # Linear warmup.
    np.testing.assert_allclose(lr(WARMUP), PEAK, rtol=1e-6)
    np.testing.assert_allclose(lr(TOTAL), end, rtol=1e-6)
    np.testing.assert_allclose(lr(TOTAL + 500), end, rtol=1e-6)  # Stays at the floor after total_steps.


def test_cosine_decay_follows_the_closed_form():
    lr = schedule("cosine")
    decay_steps = TOTAL - WARMUP  # 1000
    np.testing.assert_allclose(lr(WARMUP + decay_steps // 2), PEAK * (END_RATIO + (1 - END_RATIO) * 0.5), rtol=1e-6)
    for t in (1, 250, 999):
        want = PEAK * (END_RATIO + (1 - END_RATIO) * 0.5 * (1 + math.cos(math.pi * t / decay_steps)))
        np.testing.assert_allclose(lr(WARMUP + t), want, rtol=1e-6, err_msg=f"t={t}")


def test_linear_decay_follows_the_closed_form():
    lr = schedule("linear")
    decay_steps = TOTAL - WARMUP
    for t in (250, 500, 750):
        np.testing.assert_allclose(lr(WARMUP + t), PEAK * (1 - (1 - END_RATIO) * t / decay_steps), rtol=1e-6)


def test_constant_schedule_stays_at_the_peak_after_warmup():
    lr = schedule("constant")
    for step in (WARMUP, WARMUP + 1, (WARMUP + TOTAL) // 2, TOTAL - 1, TOTAL):
        np.testing.assert_allclose(lr(step), PEAK, rtol=1e-6)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_no_warmup_starts_at_the_peak(kind):
    lr = schedule(kind, warmup=0)
    np.testing.assert_allclose(lr(0), PEAK, rtol=1e-6)
    np.testing.assert_allclose(lr(TOTAL), PEAK if kind == "constant" else END_RATIO * PEAK, rtol=1e-6)
    if kind == "cosine":
        np.testing.assert_allclose(lr(TOTAL // 2), PEAK * (END_RATIO + (1 - END_RATIO) * 0.5), rtol=1e-6)
