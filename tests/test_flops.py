"""Parameter counts from configs equal initialised counts; FLOP formulas match hand arithmetic."""

import glob

import flax.linen as nn
import jax
import pytest

from lm import config as lm_config
from lm import flops
from lm import model as model_lib

# Shapes the small test configs vary over, so every branch of param_count is exercised.
VARIANTS = [
    {},
    {"model.position_embedding": "learned", "model.norm": "layernorm", "model.mlp_activation": "gelu",
     "model.qkv_bias": True, "model.attention_out_bias": True, "model.mlp_bias": True, "model.tie_embeddings": True},
    {"model.norm_position": "post", "model.num_kv_heads": 1},
    {"model.head_dim": 24, "model.qkv_bias": True, "model.mlp_bias": True},  # Heads not d_model / num_heads wide.
    {"model.norm": "scalenorm", "model.position_embedding": "relative"},
    {"model.attention_type": "mla", "model.mla.q_lora_rank": 32, "model.qkv_bias": True,
     "model.attention_out_bias": True},
    {"model.attention_type": "mla", "model.moe.num_experts": 8, "model.moe.shared_experts": 2,
     "model.moe.first_dense_layers": 1, "model.mlp_bias": True},
    {"model.moe.num_experts": 4, "model.mlp_activation": "gelu", "model.scan_layers": False},
]


def test_active_parameters_leave_out_the_experts_a_token_is_not_routed_to():
    config = lm_config.load("configs/tiny.py", **{"model.moe.num_experts": 8, "model.moe.experts_per_token": 2,
                                                  "model.moe.first_dense_layers": 1})
    m = config.model
    unused_experts = (m.num_layers - 1) * (8 - 2) * 3 * m.d_model * m.moe.expert_dim
    assert flops.active_param_count(config) == flops.param_count(config) - unused_experts
    dense = lm_config.load("configs/tiny.py")
    assert flops.active_param_count(dense) == flops.param_count(dense)


def abstract_param_count(config):
    model = model_lib.build(config)
    shapes = jax.eval_shape(lambda: nn.unbox(model_lib.init(model, jax.random.key(0))))
    return sum(leaf.size for leaf in jax.tree.leaves(shapes))


@pytest.mark.parametrize("path", sorted(glob.glob("configs/*.py")))
def test_param_count_equals_initialised_count_for_every_shipped_config(path):
    config = lm_config.load(path)
    assert flops.param_count(config) == abstract_param_count(config)


@pytest.mark.parametrize("overrides", VARIANTS)
def test_param_count_equals_initialised_count_for_variants(overrides):
    config = lm_config.load("configs/tiny.py", **overrides)
    assert flops.param_count(config) == abstract_param_count(config)


def test_reference_model_sizes():
    assert flops.param_count(lm_config.load("configs/gpt2_124m.py")) == 124_439_808  # HF gpt2, tied.
    assert flops.param_count(lm_config.load("configs/llama_1b.py")) == 1_235_814_400  # Llama-3.2-1B.
    assert flops.param_count(lm_config.load("configs/llama_8b.py")) == 8_030_261_248  # Llama-3-8B.


def test_train_flops_per_token_by_hand_for_llama_8b():
    config = lm_config.load("configs/llama_8b.py")
    d, L, f, V, kv = 4096, 32, 14336, 128256, 8 * 128
    matmul = L * (2 * d * d + 2 * d * kv + 3 * d * f) + d * V
    assert flops.matmul_param_count(config) == matmul
    T = 8192
    assert flops.train_flops_per_token(config, T) == pytest.approx(6 * matmul + 12 * L * d * (T + 1) / 2)
    assert flops.train_flops_per_token(config, T, causal=False) == pytest.approx(6 * matmul + 12 * L * d * T)
