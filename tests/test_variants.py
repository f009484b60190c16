"""The model variants one config field away: ScaleNorm, T5's relative position bias, ALiBi and multi-head latent
attention (MLA): their definitions, decoding against the cache, and short runs on the default corpus that learn."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import config as lm_config
from lm import kv_cache
from lm import layers
from lm import model as model_lib
from lm import train as train_lib
from lm import train_step as train_step_lib

from test_generate import full_logits
from test_model import init_params, random_tokens, small_config

MLA = dict(attention_type="mla", mla=dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10))


def test_scalenorm_is_one_learned_gain_times_the_unit_vector():
    config = small_config(norm="scalenorm")
    norm = layers.Norm(model_lib.model_config(config))
    x_btd = jax.random.normal(jax.random.key(0), (2, 3, 32)) * 5
    params = norm.init(jax.random.key(1), x_btd)["params"]
    gain = nn.unbox(params)["scale"]
    assert gain.shape == () and np.isclose(gain, np.sqrt(32)), "the gain starts at sqrt(d): an RMSNorm without gain"
    params = {"scale": jnp.float32(3.0)}
    expected_btd = 3.0 * x_btd / np.linalg.norm(x_btd, axis=-1, keepdims=True)
    np.testing.assert_allclose(norm.apply({"params": params}, x_btd), expected_btd, rtol=1e-6, atol=1e-6)
    assert np.all(np.asarray(norm.apply({"params": params}, jnp.zeros((1, 1, 32)))) == 0), "a zero vector stays 0"


def test_relative_buckets_equal_t5s_and_the_bias_is_the_bucket_entry_per_head():
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    import torch

    query_t, key_s = jnp.arange(300), jnp.arange(300)
    for num_buckets, max_distance in ((32, 128), (8, 20)):
        ours_ts = model_lib.relative_buckets(query_t, key_s, num_buckets, max_distance)
        relative_ts = torch.arange(300)[None, :] - torch.arange(300)[:, None]  # key - query, as T5.
        theirs_ts = t5.T5Attention._relative_position_bucket(
            relative_ts, bidirectional=False, num_buckets=num_buckets, max_distance=max_distance)
        np.testing.assert_array_equal(np.asarray(ours_ts), theirs_ts.numpy())

    config = small_config(position_embedding="relative", relative_buckets=8, relative_max_distance=20)
    model, params = init_params(config)
    bias_1nts = model.apply({"params": params}, 12, None, method=model._position_bias)
    buckets_ts = model_lib.relative_buckets(jnp.arange(12), jnp.arange(12), 8, 20)
    np.testing.assert_array_equal(bias_1nts[0], np.transpose(params["relative_bias"][buckets_ts], (2, 0, 1)))


@pytest.mark.parametrize("q_lora_rank", [0, 6], ids=["full query", "query latent"])
def test_mla_absorbed_decoding_equals_expanded_decoding_and_the_full_forward(q_lora_rank):
    """Left-padded rows, a prefill then one token per step; the absorbed cache path (no per-head keys or values)
    against the expanded one (1e-5) and both against the ordinary forward at every generated position."""
    mla = dict(MLA["mla"], q_lora_rank=q_lora_rank)
    absorbed_config = small_config(attention_type="mla", mla=dict(mla, absorb=True))
    expanded_config = small_config(attention_type="mla", mla=dict(mla, absorb=False))
    model, params = init_params(absorbed_config)
    expanded_model = model_lib.build(expanded_config)
    prompts = [[5, 17, 3], [9, 8, 7, 6, 5, 4, 3, 2]]
    continuation_bt = np.asarray(random_tokens((2, 6), seed=4))
    width = 8
    start_b = jnp.asarray([width - len(p) for p in prompts])
    prompt_bt = jnp.asarray([[0] * (width - len(p)) + p for p in prompts])

    def decode_all(model):
        decode = jax.jit(lambda p, t, c: model.apply({"params": p}, t, c, method=model.decode))
        cache = kv_cache.KVCache.zeros(model.cfg, start_b, width + 6)
        logits_bv, cache = decode(params, prompt_bt, cache)
        steps = [logits_bv]
        for i in range(5):
            logits_bv, cache = decode(params, continuation_bt[:, i:i + 1], cache)
            steps.append(logits_bv)
        return np.stack(steps, axis=1), cache

    absorbed_btv, cache = decode_all(model)
    expanded_btv, _ = decode_all(expanded_model)
    np.testing.assert_allclose(absorbed_btv, expanded_btv, rtol=0, atol=1e-5)
    for b, prompt in enumerate(prompts):
        reference_tv = full_logits(model, params, prompt + continuation_bt[b].tolist())
        np.testing.assert_allclose(absorbed_btv[b], reference_tv[len(prompt) - 1:len(prompt) + 5], rtol=0, atol=1e-5)
    # The cache: one latent (kv_lora_rank) and one rotary key (qk_rope_head_dim) per token per layer, nothing else.
    assert cache.value_lbsgh is None
    assert cache.key_lbsgh.shape == (2, 2, width + 6, 1, 16 + 8)
    assert kv_cache.KVCache.values_per_token(model.cfg) == 24


def test_mla_parameters_follow_deepseek_and_carry_logical_axis_names():
    model = model_lib.build(small_config(attention_type="mla", mla=dict(MLA["mla"], q_lora_rank=6)))
    boxed = jax.eval_shape(lambda: model_lib.init(model, jax.random.key(0)))
    attention = boxed["layers"]["attention"]
    shapes = jax.tree.map(lambda leaf: leaf.value.shape, attention, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    layers, d, n = 2, 32, 4
    assert shapes == {
        "query_a": {"kernel": (layers, d, 6)}, "query_norm": {"scale": (layers, 6)},
        "query_b": {"kernel": (layers, 6, n, 12 + 8)},
        "kv_a": {"kernel": (layers, d, 16 + 8)}, "kv_norm": {"scale": (layers, 16)},
        "kv_b": (layers, 16, n, 12 + 10), "out": {"kernel": (layers, n, 10, d)}}
    names = jax.tree.leaves(jax.tree.map(lambda leaf: leaf.names, attention,
                                         is_leaf=lambda x: isinstance(x, nn.Partitioned)), is_leaf=lambda x: isinstance(x, tuple))
    assert all(name[0] == "layers" and None not in name for name in names)


@pytest.mark.parametrize("overrides", [dict(position_embedding="alibi"), MLA], ids=["alibi", "mla"])
def test_blockwise_attention_in_the_model_equals_xla_in_values_and_gradients(overrides):
    """Packed rows; MLA's narrower values are padded to its query/key width for the blockwise kernel."""
    xla_model, params = init_params(small_config(**overrides))
    blockwise_model = model_lib.build(small_config(attention="blockwise", **overrides))
    tokens_bt = random_tokens((2, 16))
    segment_ids_bt = jnp.asarray([[1] * 6 + [2] * 10, [1] * 16])
    positions_bt = jnp.asarray([list(range(6)) + list(range(10)), list(range(16))])

    def loss(params, model):
        hidden_btd = model.apply({"params": params}, tokens_bt, positions_bt, segment_ids_bt)
        return jnp.sum(jnp.sin(hidden_btd)), hidden_btd

    grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
    (xla_grads, xla_btd), (blockwise_grads, blockwise_btd) = grad(params, xla_model), grad(params, blockwise_model)
    np.testing.assert_allclose(blockwise_btd, xla_btd, rtol=0, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), blockwise_grads, xla_grads)


def _train(cache_dir: str, workdir: str, steps: int, **model_overrides) -> list[dict]:
    config = lm_config.load("configs/tiny.py", **{
        "model.num_layers": 2, "model.d_model": 64, "model.num_heads": 4, "model.num_kv_heads": 2,
        "model.mlp_dim": 128, "data.seq_len": 64, "data.batch_size": 8, "data.cache_dir": cache_dir,
        "optim.warmup_steps": 5, "optim.learning_rate": 5e-3, "total_steps": steps, "log_every": 1, "eval_every": steps, "eval_steps": 2,
        "checkpoint_every": steps, **{f"model.{k}": v for k, v in model_overrides.items()}})
    train_lib.train(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [dict(norm="scalenorm"), dict(position_embedding="relative"),
                                       dict(position_embedding="alibi")], ids=lambda o: ",".join(o.values()))
def test_each_variant_learns_on_the_default_corpus(overrides, lm_cache, tmp_path):
    """40 steps of a small model: the held-out loss ends a nat below where training started (ln 2048 = 7.6)."""
    lines = _train(lm_cache, str(tmp_path / "run"), 40, **overrides)
    first_loss = next(line["loss"] for line in lines if "loss" in line)
    eval_loss = next(line["eval_loss"] for line in lines if "eval_loss" in line)
    assert np.isfinite(eval_loss) and eval_loss < first_loss - 1.0, (first_loss, eval_loss)


@pytest.mark.parametrize("overrides, message", [
    (dict(position_embedding="relative", attention="blockwise"), "cannot take; use 'xla'"),
    (dict(position_embedding="alibi", attention="splash"), "config.model.attention='splash' cannot take"),
    (dict(attention="splash"), "multiples of 128: config.data.seq_len=16"),
    (dict(attention_type="mla", position_embedding="learned"), "set config.model.position_embedding='rope'"),
    (dict(attention_type="mla", mla=dict(qk_rope_head_dim=7)), "qk_rope_head_dim=7 must be even"),
    (dict(moe=dict(num_experts=4, experts_per_token=5)), "experts_per_token=5 must be at most"),
    (dict(moe=dict(num_experts=6, num_groups=4)), "num_groups=4 must divide num_experts=6"),
    (dict(moe=dict(num_experts=4, first_dense_layers=2)), "leaves no mixture-of-experts layer"),
    (dict(norm="rmsnorm2"), "config.model.norm='rmsnorm2' is not one of rmsnorm, layernorm, scalenorm"),
])
def test_variant_misconfigurations_fail_in_one_line_before_compiling(overrides, message):
    with pytest.raises(lm_config.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        small_config(**overrides)
    assert "\n" not in str(error.value)


def test_lora_targets_an_mla_model_lacks_and_experts_split_unevenly_are_refused():
    config = small_config(attention_type="mla")
    config.finetune.update(method="lora", lora=dict(targets=("query", "key")))
    config.init_from = "/some/base"
    with pytest.raises(lm_config.ConfigError, match="an MLA model has no key or value projection"):
        lm_config.validate(config)
    config = lm_config.load("configs/tiny.py", **{"model.moe.num_experts": 6, "mesh.expert": 4, "mesh.fsdp": 2})
    with pytest.raises(lm_config.ConfigError, match="num_experts=6 must be divisible by the expert-parallel size"):
        train_step_lib.build(config)
