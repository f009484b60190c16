"""Mixture-of-experts layers inside the Transformer and its training: dense layers before the experts, routing
statistics in the step's metrics, expert parallelism on an `expert` mesh axis, and load balancing that works."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from lm import config as lm_config
from lm import model as model_lib
from lm import sharding as sharding_lib

from test_sharding import batches, setup

MOE = {"model.moe.num_experts": 8, "model.moe.experts_per_token": 2, "model.moe.expert_dim": 32,
       "model.moe.shared_experts": 1}


def moe_config(mesh=(1, 1, 1, 1), **overrides):
    """configs/tiny.py shrunk: 3 layers, the first dense, 8 experts of width 32 (2 per token, 1 shared)."""
    config = lm_config.load("configs/tiny.py", **{
        "model.num_layers": 3, "model.d_model": 64, "model.num_heads": 4, "model.num_kv_heads": 2,
        "model.mlp_dim": 128, "model.vocab_size": 256, "model.moe.first_dense_layers": 1, "data.seq_len": 16,
        "data.batch_size": 16, "optim.warmup_steps": 2, "total_steps": 10, **MOE, **overrides})
    config.mesh.update(data=mesh[0], fsdp=mesh[1], expert=mesh[2], tensor=mesh[3])
    return lm_config.validate(config)


def test_dense_layers_come_first_and_experts_carry_the_expert_axis():
    model = model_lib.build(moe_config())
    boxed = jax.eval_shape(lambda: model_lib.init(model, jax.random.key(0)))
    names = lambda tree: jax.tree.map(lambda leaf: (leaf.value.shape, leaf.names), tree,
                                      is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert names(boxed["dense_layers"]["mlp"]["up"]["kernel"]) == ((1, 64, 128), ("layers", "embed", "mlp"))
    assert names(boxed["layers"]["mlp"]["up"]) == ((2, 8, 64, 32), ("layers", "expert", "embed", "mlp"))
    assert names(boxed["layers"]["mlp"]["router"]["bias"])[0] == (2, 8)
    shardings = sharding_lib.model_shardings(moe_config(mesh=(2, 1, 4, 1)), jax.sharding.Mesh(
        np.asarray(jax.devices()).reshape(2, 1, 4, 1), sharding_lib.MESH_AXES))
    assert shardings.params["layers"]["mlp"]["up"].spec[1] == "expert", "experts split over the expert axis"
    assert shardings.batch.spec[0] == ("data", "fsdp", "expert"), "everything else is data parallel over it"


def test_unscanned_layers_equal_the_scanned_stacks():
    scanned_config, unrolled_config = moe_config(), moe_config(**{"model.scan_layers": False})
    model = model_lib.build(scanned_config)
    params = nn.unbox(model_lib.init(model, jax.random.key(0)))
    unrolled = {k: v for k, v in params.items() if k not in ("layers", "dense_layers")}
    unrolled["layers_0"] = jax.tree.map(lambda x: x[0], params["dense_layers"])
    for i in (1, 2):
        unrolled[f"layers_{i}"] = jax.tree.map(lambda x: x[i - 1], params["layers"])
    tokens_bt = jax.random.randint(jax.random.key(1), (2, 16), 0, 256)
    apply = lambda m, p: m.apply({"params": p}, tokens_bt, mutable=["intermediates"])
    (scanned_btd, scanned_vars), (unrolled_btd, unrolled_vars) = apply(model, params), apply(
        model_lib.build(unrolled_config), unrolled)
    np.testing.assert_allclose(scanned_btd, unrolled_btd, rtol=1e-5, atol=1e-5)
    stats, unrolled_stats = model_lib.moe_stats_of(scanned_vars), model_lib.moe_stats_of(unrolled_vars)
    assert stats["load_e"].shape == (2, 8), "one row of loads per MoE layer"
    np.testing.assert_allclose(stats["load_e"], unrolled_stats["load_e"], atol=1e-6)


def train_losses(config, devices=None, steps=10):
    shardings, state, step = setup(config, devices)
    losses, metrics = [], None
    for batch in batches(config, steps):
        state, metrics = step(state, jax.device_put(batch, shardings.batch), {})
        losses.append(float(metrics["loss"]))
    return np.array(losses), metrics, state


@pytest.mark.parametrize("capacity_factor", [0.0, 2.0], ids=["dropless", "capacity"])
def test_expert_parallel_training_matches_one_device(capacity_factor):
    """10 steps on a (data 2, expert 4) mesh against one device: the same losses (aux loss included)."""
    overrides = {"model.moe.capacity_factor": capacity_factor}
    reference, _, _ = train_losses(moe_config(**overrides), devices=jax.devices()[:1])
    losses, metrics, _ = train_losses(moe_config(mesh=(2, 1, 4, 1), **overrides))
    np.testing.assert_allclose(losses, reference, rtol=1e-5)
    assert {"moe/aux_loss", "moe/dropped", "moe/max_load", "moe/load/0", "moe/load/7"} <= set(metrics)
    assert "moe/load_le" not in metrics, "the per-layer loads feed the bias update, not the metrics"
    np.testing.assert_allclose(sum(float(metrics[f"moe/load/{e}"]) for e in range(8)), 1.0, rtol=1e-5)


def _skewed(state, expert: int = 0, scale: float = 0.3):
    """`state` with every MoE router pushed towards one expert: its router column set to `scale` in every entry,
    so the tokens whose features sum high start there."""
    kernel_lde = state.params["layers"]["mlp"]["router"]["kernel"]
    router = {**state.params["layers"]["mlp"]["router"], "kernel": kernel_lde.at[:, :, expert].set(scale)}
    layers = {**state.params["layers"], "mlp": {**state.params["layers"]["mlp"], "router": router}}
    return state.replace(params={**state.params, "layers": layers})


def test_load_balancing_drives_a_skewed_router_towards_uniform_load():
    """A router that starts with one expert taking about twice the mean load, 60 steps on random tokens: Switch's
    auxiliary loss (through the router probabilities) and DeepSeek-V3's bias (moved against the load after each
    step) each bring the most loaded expert under 1.3 times the mean load; with neither, the skew stays."""
    runs = {"off": {"model.moe.aux_loss_coef": 0.0},
            "aux_loss": {"model.moe.aux_loss_coef": 1.0},
            "bias": {"model.moe.aux_loss_coef": 0.0, "model.moe.bias_update_rate": 0.002}}
    max_loads = {}
    for name, overrides in runs.items():
        config = moe_config(**{"model.moe.first_dense_layers": 0, "model.num_layers": 2, "model.d_model": 32,
                               "data.batch_size": 32, "data.seq_len": 32, "optim.learning_rate": 1e-3,
                               "total_steps": 60, **overrides})
        shardings, state, step = setup(config, jax.devices()[:1])
        state = _skewed(state)
        loads = []
        for batch in batches(config, 60):
            state, metrics = step(state, jax.device_put(batch, shardings.batch), {})
            loads.append(float(metrics["moe/max_load"]))
        max_loads[name] = loads
    summary = {name: [round(x, 2) for x in loads[::10]] + [round(loads[-1], 2)] for name, loads in max_loads.items()}
    assert all(loads[0] > 1.7 for loads in max_loads.values()), summary
    assert max_loads["aux_loss"][-1] < 1.3 and max_loads["bias"][-1] < 1.3, summary
    assert max_loads["off"][-1] > 1.5, summary
