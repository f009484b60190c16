"""The mixture-of-experts MLP (lm.moe): routing and both dispatch paths against a dense reference, capacity drops,
the balancing statistics and bias, and expert-sharded execution."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lm import config as lm_config
from lm import moe as moe_lib

B, T, D, F, E = 4, 8, 16, 12, 8

# The programs here are tiny: XLA:CPU's backend optimisations would be half of every compilation, which is most of
# this file's time, and buy nothing.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def moe_config(mlp_activation="swiglu", **moe_overrides) -> ml_collections.FrozenConfigDict:
    """A tiny fp32 `config.model` with a `moe` section: 8 experts, 2 per token, softmax router (Mixtral-like)."""
    c = lm_config.base_config().model
    c.update(d_model=D, num_layers=2, dtype="float32", param_dtype="float32", mlp_activation=mlp_activation)
    c.moe = ml_collections.ConfigDict(dict(
        num_experts=E, experts_per_token=2, shared_experts=0, expert_dim=F, router="softmax", normalize_top_k=True,
        routed_scaling=1.0, num_groups=1, top_groups=1, capacity_factor=0.0, aux_loss_coef=0.01,
        bias_update_rate=0.0, router_z_loss_coef=0.0))
    c.moe.update(moe_overrides)
    return ml_collections.FrozenConfigDict(c)


def random_params(cfg, seed=0, bias_scale=0.0):
    """Parameters drawn in numpy (no compilation) at scales that make routing and every expert matter: random
    router bias of `bias_scale`."""
    rng = np.random.default_rng(seed)
    shapes = nn.unbox(jax.eval_shape(moe_lib.MoeMlp(cfg).init, jax.random.key(0), jnp.zeros((1, 1, D))))["params"]
    params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32) * 0.3, shapes)
    params["router"]["kernel"] *= 3  # Spread the router's scores, so choices are far from ties.
    params["router"]["bias"] = rng.normal(size=E).astype(np.float32) * bias_scale
    return jax.tree.map(jnp.asarray, params)


def inputs(seed=1, padded=False):
    """`x_btd`, `weights_bt` and a cotangent `[b, t, d]`. `padded`: the last 3 positions of rows 0 and 2 and the
    first 2 of row 1 (left padding, as in decoding) are padding."""
    rng = np.random.default_rng(seed)
    x_btd = jnp.asarray(rng.normal(size=(B, T, D)).astype(np.float32))
    weights_bt = np.ones((B, T), np.float32)
    if padded:
        weights_bt[::2, -3:] = 0
        weights_bt[1, :2] = 0
    return x_btd, jnp.asarray(weights_bt), jnp.asarray(rng.normal(size=(B, T, D)).astype(np.float32))


@functools.partial(jit, static_argnums=0)
def run_module(cfg, params, x_btd, weights_bt, cotangent_btd):
    """`(y_btd, stats, grads of sum(y * cotangent))` of `MoeMlp`."""
    def loss(params):
        y_btd, stats = moe_lib.MoeMlp(cfg).apply({"params": params}, x_btd, weights_bt)
        return jnp.sum(y_btd * cotangent_btd), (y_btd, stats)

    grads, (y_btd, stats) = jax.grad(loss, has_aux=True)(params)
    return y_btd, stats, grads


def reference_choice(moe, probs_bte, bias_e, grouped: bool):
    """The experts each token picks, `[b, t, j]`, from the definition: the top-k of probability plus bias, among the
    experts of the `top_groups` groups whose two best biased probabilities sum highest."""
    choice_bte = probs_bte + bias_e
    if grouped and moe.num_groups > 1:
        choice_btoi = choice_bte.reshape(*choice_bte.shape[:2], moe.num_groups, -1)
        group_bto = jnp.sort(choice_btoi, axis=-1)[..., -2:].sum(-1)
        best_groups = jnp.argsort(-group_bto, axis=-1)[..., :moe.top_groups]
        best_bto = (jnp.arange(moe.num_groups)[:, None] == best_groups[..., None, :]).any(-1)
        choice_bte = jnp.where(jnp.repeat(best_bto, E // moe.num_groups, axis=-1), choice_bte, -jnp.inf)
    return jnp.argsort(-choice_bte, axis=-1, stable=True)[..., :moe.experts_per_token]


def run_reference(cfg, params, x_btd, cotangent_btd, kept_btj):
    """The dense reference: every expert on every token, combined by the top-k gates (dropped assignments, where
    `kept_btj` is 0, weigh 0). Returns `(y_btd, grads of sum(y * cotangent), experts_btj, experts chosen without the
    bias, experts chosen without groups)`."""
    c = cfg.to_dict()  # A copy: writing into `cfg.as_configdict()` would change cfg itself.
    c["moe"]["capacity_factor"] = 0.0  # Not read here: configurations that differ only there share a compilation.
    return _run_reference(ml_collections.FrozenConfigDict(c), params, x_btd, cotangent_btd, kept_btj)


@functools.partial(jit, static_argnums=0)
def _run_reference(cfg, params, x_btd, cotangent_btd, kept_btj):
    moe = cfg.moe

    def forward(params):
        logits_bte = x_btd @ params["router"]["kernel"]
        probs_bte = jax.nn.softmax(logits_bte) if moe.router == "softmax" else jax.nn.sigmoid(logits_bte)
        experts_btj = reference_choice(moe, probs_bte, params["router"]["bias"], grouped=True)
        gates_btj = jnp.take_along_axis(probs_bte, experts_btj, axis=-1)
        if moe.normalize_top_k:
            gates_btj = gates_btj / gates_btj.sum(-1, keepdims=True)
        gates_btj = gates_btj * moe.routed_scaling * kept_btj
        gates_bte = jnp.sum(jax.nn.one_hot(experts_btj, E) * gates_btj[..., None], axis=2)
        if cfg.mlp_activation == "swiglu":
            h_btef = jax.nn.silu(jnp.einsum("btd,edf->btef", x_btd, params["gate"])) * jnp.einsum(
                "btd,edf->btef", x_btd, params["up"])
        else:
            h_btef = jax.nn.gelu(jnp.einsum("btd,edf->btef", x_btd, params["up"]), approximate=True)
        y_btd = jnp.einsum("btef,efd,bte->btd", h_btef, params["down"], gates_bte)
        if moe.shared_experts:
            shared = params["shared"]
            h_btf = jax.nn.silu(x_btd @ shared["gate"]["kernel"]) * (x_btd @ shared["up"]["kernel"])
            y_btd = y_btd + h_btf @ shared["down"]["kernel"]
        unbiased_btj = reference_choice(moe, probs_bte, 0.0, grouped=True)
        ungrouped_btj = reference_choice(moe, probs_bte, params["router"]["bias"], grouped=False)
        return jnp.sum(y_btd * cotangent_btd), (y_btd, experts_btj, unbiased_btj, ungrouped_btj)

    grads, (y_btd, *choices) = jax.grad(forward, has_aux=True)(params)
    return y_btd, grads, *choices


def assert_trees_close(actual, expected, tol=1e-5):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol),
                 actual, expected)


def assert_gradients_flow(grads):
    """Finite everywhere, nonzero for the router kernel and every expert kernel; exactly zero for the router bias
    (it moves choices only)."""
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    assert np.abs(grads["router"]["kernel"]).max() > 0
    for name in ("up", "down"):
        assert (np.abs(np.asarray(grads[name])).reshape(E, -1).max(axis=1) > 0).all(), name
    np.testing.assert_array_equal(grads["router"]["bias"], 0)


def expected_load(experts_btj, weights_bt):
    counts_e = np.zeros(E)
    for (b, t, _), e in np.ndenumerate(np.asarray(experts_btj)):
        counts_e[e] += weights_bt[b, t]
    return counts_e / counts_e.sum()


VARIANTS = {
    # Mixtral: softmax over all experts, the top 2 renormalised.
    "mixtral": dict(),
    # Switch: one expert, its softmax probability as the gate; GELU experts; padding in the batch.
    "switch": dict(mlp_activation="gelu", experts_per_token=1, normalize_top_k=False),
    # DeepSeek-V3: sigmoid scores, a selection bias, 4 groups of which 2 are searched, scaled gates, shared experts.
    "deepseek_v3": dict(router="sigmoid", routed_scaling=2.5, num_groups=4, top_groups=2, shared_experts=2,
                        experts_per_token=3),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_dropless_equals_dense_reference_with_gradients(variant):
    cfg = moe_config(**VARIANTS[variant])
    params = random_params(cfg, bias_scale=0.2 if variant == "deepseek_v3" else 0.0)
    x_btd, weights_bt, cotangent_btd = inputs(padded=variant == "switch")
    y_btd, stats, grads = run_module(cfg, params, x_btd, weights_bt, cotangent_btd)
    kept_btj = jnp.ones((B, T, cfg.moe.experts_per_token))
    ref_btd, ref_grads, experts_btj, unbiased_btj, ungrouped_btj = run_reference(
        cfg, params, x_btd, cotangent_btd, kept_btj)
    np.testing.assert_allclose(y_btd, ref_btd, rtol=1e-5, atol=1e-5)
    assert_trees_close(grads, ref_grads)
    assert_gradients_flow(grads)
    np.testing.assert_allclose(stats["load_e"], expected_load(experts_btj, np.asarray(weights_bt)), atol=1e-6)
    assert float(stats["dropped"]) == 0.0
    if variant == "deepseek_v3":
        # Neither the bias nor the group limit is idle here: each changes some token's experts.
        assert (np.sort(experts_btj, -1) != np.sort(unbiased_btj, -1)).any()
        assert (np.sort(experts_btj, -1) != np.sort(ungrouped_btj, -1)).any()


def test_capacity_large_enough_drops_nothing_and_equals_dropless():
    # capacity_factor E / k gives every expert t slots per row: room for all.
    cfg = moe_config(capacity_factor=E / 2)
    assert moe_lib.capacity(cfg, T) == T
    params = random_params(cfg)
    x_btd, weights_bt, cotangent_btd = inputs()
    y_btd, stats, grads = run_module(cfg, params, x_btd, weights_bt, cotangent_btd)
    ref_btd, ref_grads, *_ = run_reference(cfg, params, x_btd, cotangent_btd, jnp.ones((B, T, 2)))
    np.testing.assert_allclose(y_btd, ref_btd, rtol=1e-5, atol=1e-5)
    assert_trees_close(grads, ref_grads)
    assert float(stats["dropped"]) == 0.0


def test_small_capacity_drops_in_token_order_and_padding_takes_no_slot():
    cfg = moe_config(capacity_factor=0.75)  # ceil(0.75 * 8 * 2 / 8) = 2 slots per expert per row.
    slots = moe_lib.capacity(cfg, T)
    assert slots == 2
    params = random_params(cfg)
    x_btd, weights_bt, cotangent_btd = inputs(padded=True)
    _, _, experts_btj, *_ = run_reference(cfg, params, x_btd, cotangent_btd, jnp.ones((B, T, 2)))
    # By hand: each row's real assignments, in token order and a token's choices in order, fill their expert's slots.
    kept_btj = np.zeros((B, T, 2), np.float32)
    for b in range(B):
        taken_e = np.zeros(E, int)
        for t in range(T):
            for j, e in enumerate(np.asarray(experts_btj)[b, t]):
                if weights_bt[b, t] and taken_e[e] < slots:
                    taken_e[e] += 1
                    kept_btj[b, t, j] = 1
    real_assignments = 2 * float(weights_bt.sum())
    expected_dropped = 1 - kept_btj.sum() / real_assignments
    assert 0.1 < expected_dropped < 0.9  # Some, not all, dropped: the test means something.

    y_btd, stats, grads = run_module(cfg, params, x_btd, weights_bt, cotangent_btd)
    np.testing.assert_allclose(stats["dropped"], expected_dropped, rtol=1e-6)
    # Dropped assignments add nothing: the reference with their gates zeroed (padding rows: all zeroed).
    ref_btd, ref_grads, *_ = run_reference(cfg, params, x_btd, cotangent_btd, jnp.asarray(kept_btj))
    np.testing.assert_allclose(y_btd, ref_btd, rtol=1e-5, atol=1e-5)
    assert_trees_close(grads, ref_grads)
    assert_gradients_flow(grads)
    # The load counts routed assignments, before any drop; padding is not counted.
    np.testing.assert_allclose(stats["load_e"], expected_load(experts_btj, np.asarray(weights_bt)), atol=1e-6)


routing_stats = jit(moe_lib.routing_stats, static_argnames="router")


def test_aux_and_z_losses_by_hand():
    rng = np.random.default_rng(0)
    logits_bte = rng.normal(size=(2, 5, E)).astype(np.float32)
    experts_btj = np.stack([rng.permutation(E)[:2] for _ in range(10)]).reshape(2, 5, 2)
    weights_bt = np.ones((2, 5), np.float32)
    weights_bt[1, 3:] = 0
    for router in ("softmax", "sigmoid"):
        probs_bte = np.asarray(jax.nn.softmax(logits_bte) if router == "softmax" else jax.nn.sigmoid(logits_bte))
        stats = routing_stats(jnp.asarray(logits_bte), jnp.asarray(probs_bte), jnp.asarray(experts_btj),
                                      jnp.asarray(weights_bt), router=router)
        real = weights_bt > 0
        load_e = np.bincount(experts_btj[real].ravel(), minlength=E) / (2 * real.sum())
        share_xe = probs_bte[real] / probs_bte[real].sum(-1, keepdims=True)
        np.testing.assert_allclose(stats["load_e"], load_e, rtol=1e-6)
        np.testing.assert_allclose(stats["aux_loss"], E * np.sum(load_e * share_xe.mean(0)), rtol=1e-5)
        lse_x = np.log(np.exp(logits_bte[real]).sum(-1))
        np.testing.assert_allclose(stats["router_z_loss"], np.mean(lse_x ** 2), rtol=1e-5)


def test_aux_loss_is_one_for_uniform_routing_and_e_over_k_for_collapse():
    ones_bt = jnp.ones((2, 5))
    spread_btj = (jnp.arange(20) % E).reshape(2, 5, 2)  # Every token its own two experts, all experts in turn.
    # Uniform probabilities: the minimum, 1, whatever the choices.
    uniform = routing_stats(jnp.zeros((2, 5, E)), jnp.full((2, 5, E), 1 / E), spread_btj, ones_bt, router="softmax")
    np.testing.assert_allclose(uniform["aux_loss"], 1.0, rtol=1e-6)
    # Every token puts all its probability on experts 0 and 1 and chooses them: E / k, the most k choices can cost.
    collapsed_bte = jnp.zeros((2, 5, E)).at[..., :2].set(0.5)
    collapsed = routing_stats(jnp.zeros((2, 5, E)), collapsed_bte, jnp.broadcast_to(jnp.arange(2), (2, 5, 2)),
                              ones_bt, router="softmax")
    np.testing.assert_allclose(collapsed["aux_loss"], E / 2, rtol=1e-6)
    np.testing.assert_allclose(collapsed["load_e"], [0.5, 0.5] + [0.0] * (E - 2))


def test_updated_router_bias_lowers_overloaded_and_raises_underloaded_experts():
    load_le = jnp.array([[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]])  # Two layers; the second balanced.
    bias_le = jnp.array([[0.0, 0.1, -0.1, 0.0], [0.3, 0.0, 0.0, 0.0]])
    updated_le = moe_lib.updated_router_bias(bias_le, load_le, 0.01)
    np.testing.assert_allclose(updated_le, [[-0.01, 0.1, -0.1, 0.01], [0.3, 0.0, 0.0, 0.0]], rtol=1e-6)


def test_init_names_shapes_and_per_expert_fans():
    """Logical axis names and shapes (what lm.sharding and weight import rely on), and expert kernels initialised
    with one expert's fans (xavier: uniform in +-sqrt(6 / (d + f))), not E times them."""
    cfg = ml_collections.FrozenConfigDict({**moe_config(shared_experts=2).to_dict(), "init": "xavier"})
    boxed = jit(moe_lib.MoeMlp(cfg).init)(jax.random.key(0), jnp.zeros((1, 1, D)))["params"]
    layout = jax.tree.map(lambda p: (p.value.shape, p.value.dtype, p.names), boxed,
                          is_leaf=lambda p: isinstance(p, nn.Partitioned))
    assert layout == {
        "router": {"kernel": ((D, E), jnp.float32, ("embed", None)), "bias": ((E,), jnp.float32, (None,))},
        "gate": ((E, D, F), jnp.float32, ("expert", "embed", "mlp")),
        "up": ((E, D, F), jnp.float32, ("expert", "embed", "mlp")),
        "down": ((E, F, D), jnp.float32, ("expert", "mlp", "embed")),
        "shared": {"gate": {"kernel": ((D, 2 * F), jnp.float32, ("embed", "mlp"))},
                   "up": {"kernel": ((D, 2 * F), jnp.float32, ("embed", "mlp"))},
                   "down": {"kernel": ((2 * F, D), jnp.float32, ("mlp", "embed"))}},
    }
    np.testing.assert_array_equal(boxed["router"]["bias"].value, 0)
    gate_edf = np.asarray(boxed["gate"].value)
    limit = math.sqrt(6 / (D + F))
    assert 0.9 * limit < np.abs(gate_edf).max() <= limit
    assert not np.allclose(gate_edf[0], gate_edf[1])  # Each expert its own draw.


# DeepSeek-V3 routing without a capacity, Mixtral's with one (the configurations above: their single-device runs are
# compiled already).
SHARDED = {"dropless": dict(VARIANTS["deepseek_v3"], bias_scale=0.2), "capacity": dict(capacity_factor=0.75)}


@pytest.mark.parametrize("dispatch", SHARDED)
def test_expert_sharded_run_equals_unsharded(dispatch):
    """Under jit on a (data=2, expert=4) mesh, experts sharded over `expert` and rows over `data`, the output and
    statistics equal the single-device run."""
    overrides = dict(SHARDED[dispatch])
    bias_scale = overrides.pop("bias_scale", 0.0)
    cfg = moe_config(**overrides)
    params = random_params(cfg, bias_scale=bias_scale)
    x_btd, weights_bt, cotangent_btd = inputs(padded=True)
    expected_btd, expected_stats, _ = run_module(cfg, params, x_btd, weights_bt, cotangent_btd)

    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ("data", "expert"))
    rules = (("batch", "data"), ("expert", "expert"))
    module = moe_lib.MoeMlp(cfg)
    boxed = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 1, D)))["params"]
    param_shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    assert param_shardings["gate"].spec == P("expert", None, None)
    rows = NamedSharding(mesh, P("data"))

    @jit
    def sharded(params, x_btd, weights_bt):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
            return module.apply({"params": params}, x_btd, weights_bt)

    y_btd, stats = sharded(jax.device_put(params, param_shardings), jax.device_put(x_btd, rows),
                           jax.device_put(weights_bt, rows))
    np.testing.assert_allclose(y_btd, expected_btd, rtol=1e-5, atol=1e-5)
    assert_trees_close(stats, expected_stats)
