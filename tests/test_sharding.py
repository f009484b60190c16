"""Meshes, ZeRO stages 0-3 and the sharded train step on 8 simulated CPU devices."""

import re

import flax.linen as nn
import jax
import numpy as np
import pytest

from lm import config as lm_config
from lm import model as model_lib
from lm import sharding as sharding_lib
from lm import train_step as train_step_lib

STEPS = 10
BATCH, SEQ = 16, 32


def tiny_config(mesh=(1, 1, 1), zero_stage=0, **overrides):
    """configs/tiny.py with 2 layers and short sequences, so 20 mesh/stage combinations compile quickly."""
    config = lm_config.load("configs/tiny.py", **{
        "model.num_layers": 2, "data.seq_len": SEQ, "data.batch_size": BATCH, "optim.warmup_steps": 2,
        "total_steps": STEPS, "sharding.zero_stage": zero_stage, **overrides})
    config.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
    return lm_config.validate(config)


def batches(config, count=STEPS, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        tokens = rng.integers(0, config.model.vocab_size, (config.data.batch_size, config.data.seq_len + 1))
        weights = (rng.random((config.data.batch_size, config.data.seq_len)) > 0.1).astype(np.float32)
        yield {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
               "weights": weights}


def setup(config, devices=None):
    training = train_step_lib.build(config, devices)
    return training.shardings, training.init_state(), training.train_step()


def train(config, devices=None):
    shardings, state, step = setup(config, devices)
    losses = []
    for batch in batches(config):
        batch = jax.device_put(batch, shardings.batch)
        state, metrics = step(state, batch, {})
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.tree.map(np.asarray, state.params), state


def assert_params_close(params, reference_params):
    """Equal within fp32 reduction-order noise.

    Sums run in another order on other meshes or micro-batches. Adam divides by sqrt(v), so a weight whose gradients
    are near zero (an embedding row seen once) can move by a visibly different fraction of one step (lr = 1e-3):
    allow 5% of one step's update in absolute terms, 1e-4 relative everywhere else.
    """
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=5e-5),
                 params, reference_params)


@pytest.fixture(scope="module")
def single_device_run():
    losses, params, _ = train(tiny_config(), devices=jax.devices()[:1])
    return losses, params


MESHES = [(8, 1, 1), (1, 8, 1), (2, 4, 1), (2, 2, 2), (1, 4, 2)]


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: "x".join(map(str, m)))
def test_every_mesh_and_zero_stage_matches_one_device(single_device_run, mesh, zero_stage):
    reference_losses, reference_params = single_device_run
    losses, params, _ = train(tiny_config(mesh, zero_stage))
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)
    assert_params_close(params, reference_params)
    assert losses[-1] < losses[0]


def per_device_fraction(tree) -> float:
    """Bytes on device 0 over the bytes of the whole (global) tree."""
    leaves = [leaf for leaf in jax.tree.leaves(tree) if hasattr(leaf, "addressable_shards")]
    device0 = jax.devices()[0]
    on_device0 = sum(shard.data.nbytes for leaf in leaves for shard in leaf.addressable_shards
                     if shard.device == device0)
    return on_device0 / sum(leaf.nbytes for leaf in leaves)


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_per_device_bytes_by_zero_stage_on_8_data_parallel_devices(zero_stage):
    config = tiny_config((8, 1, 1), zero_stage)
    _, state, _ = setup(config)
    params_fraction = per_device_fraction(state.params)
    state_fraction = per_device_fraction(state.opt_state)
    # Leaves below MIN_SHARDED_ELEMENTS (norm scales, the step count) stay replicated.
    tiny_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state.opt_state)
                     if leaf.size < sharding_lib.MIN_SHARDED_ELEMENTS)
    total_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state.opt_state))
    bound = 1 / 8 + tiny_bytes / total_bytes
    print(f"stage {zero_stage}: params {params_fraction:.4f}, optimizer state {state_fraction:.4f} per device "
          f"(bound with replicated tiny leaves {bound:.4f})")
    if zero_stage == 0:
        assert state_fraction == 1.0 and params_fraction == 1.0
    else:
        assert state_fraction <= bound + 1e-9
    if zero_stage == 3:
        assert params_fraction <= bound + 1e-9
    elif zero_stage in (1, 2):
        assert params_fraction == 1.0


def compiled_text(config):
    shardings, state, step = setup(config)
    batch = next(batches(config, 1))
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings.batch) for k, v in batch.items()}
    return step.lower(state, batch, {}).compile().as_text(), state


def all_reduce_shapes(hlo_text):
    """Shapes of every all-reduce result in an HLO module (tuple results flattened)."""
    shapes = []
    for line in hlo_text.splitlines():
        match = re.search(r"= \(?(.*?)\)? all-reduce(-start)?\(", line)
        if match:
            shapes += re.findall(r"[a-z0-9]+\[([\d,]*)\]", match.group(1))
    return {tuple(int(d) for d in s.split(",") if d) for s in shapes}


def test_stage0_all_reduces_full_size_gradients():
    text, state = compiled_text(tiny_config((8, 1, 1), 0))
    embedding_shape = state.params["embed"]["embedding"].shape
    assert embedding_shape in all_reduce_shapes(text)


@pytest.mark.parametrize("zero_stage,full_size_buffers", [(1, 2), (2, 1), (3, 0)])
def test_micro_batch_loop_keeps_gradients_partitioned_from_stage_2(zero_stage, full_size_buffers):
    """The gradient accumulator carried across micro-batches is full-size at stage 1 and 1/8 at stages 2 and 3.

    The accumulation loop carries the embedding and its gradient: stage 1 has both full-size, stage 2 keeps the
    parameter full and the gradient partitioned, stage 3 partitions both. (XLA's GPU and TPU pipelines rewrite the
    gradient reduction into `reduce-scatter`; the CPU backend has no reduce-scatter creator pass and emits the
    equivalent all-reduce + slice, so the CPU check is on the buffers, not the collective's name.)
    """
    config = tiny_config((8, 1, 1), zero_stage, **{"optim.microbatches": 4, "data.batch_size": 32})
    text, state = compiled_text(config)
    vocab, d = state.params["embed"]["embedding"].shape
    full, shard = f"f32[{vocab},{d}]", f"f32[{vocab},{d // 8}]"
    loops = [line for line in text.splitlines() if " while(" in line and (full in line or shard in line)]
    assert len(loops) == 1, "expected one micro-batch loop carrying the embedding gradient"
    assert loops[0].count(full) == full_size_buffers
    assert loops[0].count(full) + loops[0].count(shard) == 2


def test_gradient_accumulation_equals_one_big_batch():
    config = tiny_config((2, 2, 2), 1, **{"optim.microbatches": 4})
    big = tiny_config((2, 2, 2), 1)
    _, state_micro, step_micro = setup(config)
    _, state_big, step_big = setup(big)
    for batch in batches(config, 3):
        state_micro, metrics_micro = step_micro(state_micro, batch, {})
        state_big, metrics_big = step_big(state_big, batch, {})
        np.testing.assert_allclose(metrics_micro["loss"], metrics_big["loss"], rtol=1e-5)
        np.testing.assert_allclose(metrics_micro["grad_norm"], metrics_big["grad_norm"], rtol=1e-4)
    assert_params_close(state_micro.params, state_big.params)


@pytest.mark.parametrize("optimizer", ["lion", "sgd", "adafactor"])
def test_stage1_shards_non_adam_optimizer_state(optimizer):
    config = tiny_config((8, 1, 1), 1, **{"optim.optimizer": optimizer})
    _, state, step = setup(config)
    sharded = [leaf for leaf in jax.tree.leaves(state.opt_state)
               if leaf.size >= sharding_lib.MIN_SHARDED_ELEMENTS]
    assert sharded, "the optimizer has no large state leaves"
    for leaf in sharded:
        if any(dim % 8 == 0 for dim in leaf.shape):
            assert leaf.addressable_shards[0].data.size * 8 == leaf.size, leaf.shape
    state, metrics = step(state, next(batches(config, 1)), {})
    assert np.isfinite(float(metrics["loss"]))


def test_non_finite_loss_skips_the_update():
    config = tiny_config((8, 1, 1), 1)
    _, state, step = setup(config)
    before = jax.tree.map(np.asarray, state.params)
    batch = next(batches(config, 1))
    batch["weights"] = np.full_like(batch["weights"], np.nan)
    state, metrics = step(state, batch, {})
    assert float(metrics["skipped"]) == 1.0
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params), before)
    state, metrics = step(state, next(batches(config, 1)), {})
    assert float(metrics["skipped"]) == 0.0 and int(state.step) == 2


def test_indivisible_leaf_falls_back_to_replication():
    mesh = sharding_lib.make_mesh(tiny_config((8, 1, 1)).mesh)
    spec = sharding_lib.zero_spec(jax.sharding.PartitionSpec(None, None), (7, 4099), mesh)
    assert spec == jax.sharding.PartitionSpec(None, None)
    spec = sharding_lib.zero_spec(jax.sharding.PartitionSpec(None, None), (7, 4096), mesh)
    assert spec == jax.sharding.PartitionSpec(None, ("data", "fsdp", "expert"))


@pytest.mark.parametrize("mesh,overrides,message", [
    ((2, 2, 1), {}, r"config\.mesh: data=2 x fsdp=2 x expert=1 x tensor=1 = 4 devices, but there are 8"),
    ((-1, -1, 1), {}, r"only one mesh axis may be -1, got data=-1, fsdp=-1"),
    ((8, 1, 1), {"data.batch_size": 12}, r"config\.data\.batch_size=12 must be divisible by the data-parallel size"),
    ((1, 4, 2), {"model.num_heads": 2, "model.num_kv_heads": 1, "model.d_model": 64, "model.mlp_dim": 128},
     None),
    ((1, 1, 8), {"model.num_heads": 4}, r"config\.model\.num_heads=4 must be divisible by the tensor-parallel size"),
    ((2, 1, 4), {"model.vocab_size": 2050}, r"config\.model\.vocab_size=2050 must be divisible by the "
                                            r"tensor-parallel size config\.mesh\.tensor=4"),
])
def test_invalid_meshes_fail_before_compiling(mesh, overrides, message):
    config = tiny_config(**overrides)
    config.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
    if message is None:  # MQA with tensor=2: the single KV head is replicated, not an error.
        sharding_lib.check_divisibility(config, sharding_lib.make_mesh(config.mesh))
        return
    with pytest.raises(lm_config.ConfigError, match=message):
        sharding_lib.check_divisibility(config, sharding_lib.make_mesh(config.mesh))


def test_mesh_fills_minus_one_and_table_prints():
    config = tiny_config((2, -1, 2), 3)
    shardings, state, _ = setup(config)
    assert dict(shardings.mesh.shape) == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}
    table = sharding_lib.sharding_table(state.params)
    assert "['embed']['embedding']" in table and "bytes per device" in table


def test_llama_8b_stage3_per_device_bytes_without_allocation():
    config = lm_config.load("configs/llama_8b.py")
    config.mesh.update(data=1, fsdp=8, tensor=1)
    training = train_step_lib.build(config)
    shardings = training.shardings
    abstract_params = jax.eval_shape(lambda: nn.unbox(model_lib.init(training.model, jax.random.key(0))))
    abstract_state = jax.eval_shape(training.optimizer.init, abstract_params)
    param_bytes = 8_030_261_248 * 4
    assert sharding_lib.bytes_per_device(abstract_params, shardings.params) == pytest.approx(param_bytes / 8, rel=1e-3)
    assert sharding_lib.bytes_per_device(abstract_params, shardings.grads) == pytest.approx(param_bytes / 8, rel=1e-3)
    assert sharding_lib.bytes_per_device(abstract_state, shardings.opt_state) == pytest.approx(
        2 * param_bytes / 8, rel=1e-3)
