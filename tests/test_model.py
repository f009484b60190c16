"""The Transformer: shapes, causality, RoPE, GQA, scan, packing and logical axis names."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import config as lm_config
from lm import model as model_lib

VOCAB = 97


def small_config(**model_overrides):
    """A fp32 model small enough to run many variants quickly."""
    c = lm_config.base_config()
    c.model.update(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                   max_seq_len=32, dtype="float32", remat_policy="none", attention="xla")
    c.model.update(model_overrides)
    c.data.seq_len = 16
    return lm_config.validate(c)


def init_params(config, seed=0):
    model = model_lib.build(config)
    return model, jax.jit(lambda rng: nn.unbox(model_lib.init(model, rng)))(jax.random.key(seed))


def random_tokens(shape, seed=1):
    return jax.random.randint(jax.random.key(seed), shape, 0, VOCAB)


def hidden(model, params, tokens_bt, **kwargs):
    return jax.jit(lambda p, t, kw: model.apply({"params": p}, t, **kw))(params, tokens_bt, kwargs)


def test_output_shape_and_dtypes_bf16_compute_fp32_params():
    model, params = init_params(small_config(dtype="bfloat16"))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    out_btd = hidden(model, params, random_tokens((3, 16)))
    assert out_btd.shape == (3, 16, 32) and out_btd.dtype == jnp.bfloat16
    kernel_dv = model.apply({"params": params}, method=model_lib.Transformer.output_kernel)
    assert kernel_dv.shape == (32, VOCAB) and kernel_dv.dtype == jnp.bfloat16
    logits_btv = model.apply({"params": params}, out_btd[:, -1:], method=model_lib.Transformer.logits)
    assert logits_btv.shape == (3, 1, VOCAB) and logits_btv.dtype == jnp.float32


VARIANTS = [
    dict(),
    dict(position_embedding="learned", norm="layernorm", mlp_activation="gelu", qkv_bias=True,
         attention_out_bias=True, mlp_bias=True, tie_embeddings=True),
    dict(head_dim=16, qkv_bias=True, rope_scaling=dict(type="llama3", factor=8.0, original_max_seq_len=8)),
    dict(position_embedding="sinusoidal", norm_position="post"),
    dict(position_embedding="none", num_kv_heads=1, init="xavier"),
    dict(num_kv_heads=4, init="he", scan_layers=False),
    dict(norm="scalenorm", position_embedding="relative", relative_buckets=8, relative_max_distance=16),
    dict(position_embedding="alibi", attention="blockwise"),
    dict(attention_type="mla", mla=dict(q_lora_rank=8, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                        v_head_dim=12)),
]


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_causality_later_tokens_do_not_change_earlier_outputs(overrides):
    model, params = init_params(small_config(**overrides))
    tokens_bt = random_tokens((2, 16))
    changed_bt = tokens_bt.at[:, 9:].set((tokens_bt[:, 9:] + 5) % VOCAB)
    out_btd = hidden(model, params, tokens_bt)
    changed_btd = hidden(model, params, changed_bt)
    np.testing.assert_allclose(out_btd[:, :9], changed_btd[:, :9], rtol=1e-5, atol=1e-5)
    assert not np.allclose(out_btd[:, 9:], changed_btd[:, 9:], atol=1e-3)


@pytest.mark.parametrize("scaling", ["none", "linear", "llama3"])
def test_rope_scores_depend_only_on_relative_position(scaling):
    q_h, k_h = jax.random.normal(jax.random.key(0), (2, 64))
    cfg = small_config(head_dim=64, rope_scaling=dict(type=scaling, factor=4.0, original_max_seq_len=64)).model
    inv_freq_k = model_lib.rope_frequencies(cfg)

    def score(query_position, key_position):
        q = model_lib.rope(q_h[None, None, None], jnp.array([[query_position]]), inv_freq_k)
        k = model_lib.rope(k_h[None, None, None], jnp.array([[key_position]]), inv_freq_k)
        return float(jnp.sum(q * k))

    for offset in (0, 3, 17):
        reference = score(offset, 0)
        for shift in (1, 10, 1000):
            assert score(offset + shift, shift) == pytest.approx(reference, rel=1e-4, abs=1e-4)
    assert score(5, 0) != pytest.approx(score(6, 0), rel=1e-3)


def test_gqa_with_repeated_kv_heads_equals_mha():
    gqa_model, gqa_params = init_params(small_config(num_heads=4, num_kv_heads=2))
    mha_model = model_lib.build(small_config(num_heads=4, num_kv_heads=4))
    # Query head i uses KV head i // (n / g): repeating each KV head n/g times gives the equivalent MHA weights.
    mha_params = jax.tree.map(lambda x: x, gqa_params)
    for name in ("key", "value"):
        kernel_ldgh = gqa_params["layers"]["attention"][name]["kernel"]
        mha_params["layers"]["attention"][name]["kernel"] = jnp.repeat(kernel_ldgh, 2, axis=2)
    tokens_bt = random_tokens((2, 16))
    np.testing.assert_allclose(
        hidden(gqa_model, gqa_params, tokens_bt), hidden(mha_model, mha_params, tokens_bt), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("remat_policy", ["none", "full"])
def test_scanned_layers_equal_unrolled_stack(remat_policy):
    scanned_model, scanned_params = init_params(small_config(scan_layers=True, remat_policy=remat_policy))
    unrolled_model = model_lib.build(small_config(scan_layers=False, remat_policy=remat_policy))
    unrolled_params = {k: v for k, v in scanned_params.items() if k != "layers"}
    for i in range(2):
        unrolled_params[f"layers_{i}"] = jax.tree.map(lambda x: x[i], scanned_params["layers"])
    tokens_bt = random_tokens((2, 16))
    np.testing.assert_allclose(
        hidden(scanned_model, scanned_params, tokens_bt), hidden(unrolled_model, unrolled_params, tokens_bt),
        rtol=1e-5, atol=1e-5)

    def loss(params, model):
        return jnp.sum(hidden(model, params, tokens_bt) ** 2)

    scanned_grads = jax.jit(jax.grad(loss), static_argnums=1)(scanned_params, scanned_model)
    unrolled_grads = jax.jit(jax.grad(loss), static_argnums=1)(unrolled_params, unrolled_model)
    np.testing.assert_allclose(
        scanned_grads["layers"]["mlp"]["down"]["kernel"][1], unrolled_grads["layers_1"]["mlp"]["down"]["kernel"],
        rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("overrides", [dict(position_embedding="rope"), dict(position_embedding="learned"),
                                       dict(position_embedding="sinusoidal"), dict(position_embedding="relative"),
                                       dict(position_embedding="alibi", attention="blockwise"),
                                       dict(attention_type="mla")], ids=lambda o: ",".join(o.values()))
def test_packed_documents_equal_documents_run_alone(overrides):
    model, params = init_params(small_config(**overrides))
    doc_a, doc_b = random_tokens((1, 6), seed=2), random_tokens((1, 10), seed=3)
    packed_bt = jnp.concatenate([doc_a, doc_b], axis=1)
    segment_ids_bt = jnp.array([[1] * 6 + [2] * 10])
    positions_bt = jnp.array([list(range(6)) + list(range(10))])
    packed_btd = hidden(model, params, packed_bt, positions_bt=positions_bt, segment_ids_bt=segment_ids_bt)
    np.testing.assert_allclose(packed_btd[:, :6], hidden(model, params, doc_a), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(packed_btd[:, 6:], hidden(model, params, doc_b), rtol=1e-5, atol=1e-5)


def test_remat_policies_give_identical_gradients():
    tokens_bt = random_tokens((2, 16))
    grads = []
    for policy in ("none", "full", "dots", "dots_no_batch"):
        model, params = init_params(small_config(remat_policy=policy))
        grads.append(jax.jit(jax.grad(lambda p: jnp.sum(hidden(model, p, tokens_bt) ** 2)))(params))
    for other in grads[1:]:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads[0], other)


@pytest.mark.parametrize("overrides", VARIANTS[:2], ids=["llama_style", "gpt2_style"])
def test_every_parameter_has_logical_axis_names(overrides):
    model = model_lib.build(small_config(**overrides))
    boxed = jax.eval_shape(lambda: model_lib.init(model, jax.random.key(0)))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(leaf, nn.Partitioned) for leaf in leaves)
    known = {"batch", "length", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "layers"}
    for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= known, leaf
    layer_leaves = jax.tree.leaves(boxed["layers"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(leaf.names[0] == "layers" for leaf in layer_leaves)


def test_truncated_normal_init_scales_output_projections_by_depth():
    config = small_config(num_layers=8, d_model=64, mlp_dim=256, init_std=0.02)
    _, params = init_params(config)
    attention = params["layers"]["attention"]
    assert float(jnp.std(attention["query"]["kernel"])) == pytest.approx(0.02, rel=0.1)
    assert float(jnp.std(attention["out"]["kernel"])) == pytest.approx(0.02 / 4, rel=0.1)
