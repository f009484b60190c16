"""DeepSeek-V3 (multi-head latent attention and mixture of experts) in and out of lm against transformers itself:
tiny random `DeepseekV3ForCausalLM`s are built and saved here, imported with `lm.hf`, compared on logits, and
exported back."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from lm import config as lm_config
from lm import errors as lm_errors
from lm import model as model_lib
from lm import sharding as sharding_lib
from lm.hf import architectures, convert, weights

from test_hf import read_all

VOCAB = 96
FP32 = {"model.dtype": "float32"}
# Weights at 0.1 rather than transformers' 0.02: larger logits, and router scores far enough apart that routing,
# group limits and the score-correction bias decide something.
DEEPSEEK = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
                qk_nope_head_dim=8, v_head_dim=12, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5, max_position_embeddings=128,
                initializer_range=0.1, bos_token_id=None, eos_token_id=None)
MODELS = {
    # Both layer stacks (dense, then mixture of experts), the query latent, interleaved rotary pairs, scanned layers.
    "q latent, dense then moe": (dict(DEEPSEEK), {}),
    # The full-rank query, biases, tied embeddings, every layer MoE, one group, unnormalised gates, rotate-half rotary
    # pairs, linear rope scaling, unscanned layers.
    "full query, biases, all moe, unscanned": (dict(
        DEEPSEEK, q_lora_rank=None, attention_bias=True, tie_word_embeddings=True, first_k_dense_replace=0, n_group=1,
        norm_topk_prob=False, rope_interleave=False, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                      "rope_theta": 1e4}),
        {"model.scan_layers": False}),
}


def save_deepseek(kwargs, directory):
    """A random DeepseekV3ForCausalLM, with random score-correction biases and attention biases (transformers starts
    both at 0), saved into `directory`."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.DeepseekV3Config(**kwargs),
                                                          attn_implementation="eager").eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(kwargs["n_routed_experts"]) * 0.1)
            for module in layer.self_attn.modules():
                if isinstance(module, torch.nn.Linear) and module.bias is not None:
                    module.bias.normal_(0, 0.1)
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module", params=list(MODELS))
def deepseek(request, tmp_path_factory):
    """`(directory, torch model, lm config, lm params)` of each model of `MODELS`, imported with `config_for` and
    `load_params` (`import_checkpoint` writes these into a workdir: `test_import_and_export_through_workdirs`)."""
    kwargs, overrides = MODELS[request.param]
    directory = tmp_path_factory.mktemp("deepseek") / "model"
    model = save_deepseek(kwargs, directory)
    config = convert.config_for(str(directory), {**FP32, **overrides})
    params, _ = convert.load_params(str(directory), config)
    return str(directory), model, config, params


def shardings_of(config):
    return sharding_lib.model_shardings(config, sharding_lib.default_mesh(config))


def tokens(length=48, batch=2, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length))


def hf_logits(model, tokens_bt):
    with torch.no_grad():
        return model(torch.tensor(tokens_bt)).logits.numpy()


_FORWARDS = {}


def lm_logits(config, params, tokens_bt):
    """lm's logits, one compiled forward per model config (the counterfactuals below reuse it)."""
    key = json.dumps(config.model.to_dict(), sort_keys=True, default=str)
    if key not in _FORWARDS:
        model = model_lib.build(config)

        def forward(params, tokens_bt):
            hidden_btd = model.apply({"params": params}, tokens_bt)
            return model.apply({"params": params}, hidden_btd, method=model_lib.Transformer.logits)

        _FORWARDS[key] = jax.jit(forward)
    return np.asarray(_FORWARDS[key](params, jnp.asarray(tokens_bt)))


def test_imported_logits_match_transformers(deepseek):
    directory, model, config, params = deepseek
    m = config.model
    assert (m.attention_type, m.moe.router, m.moe.capacity_factor, m.mla.latent_norm_eps) == ("mla", "sigmoid", 0, 1e-6)
    assert ("layers_0" in params) == (not m.scan_layers)
    assert ("dense_layers" in params) == (m.scan_layers and m.moe.first_dense_layers > 0)
    tokens_bt = tokens()
    expected = hf_logits(model, tokens_bt)
    got = lm_logits(config, params, tokens_bt)
    largest, error = np.abs(expected).max(), np.abs(got - expected).max()
    assert largest > 0.5, "logits this small would hide errors"
    assert error <= 1e-4, (error, largest)

    # The comparison can fail: without the score-correction bias, or with the rotary pairs read in the other layout
    # (once: an import is not cheap).
    unbiased = jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.zeros_like(leaf) if "router" in str(path) and "bias" in str(path) else leaf, params)
    assert np.abs(lm_logits(config, unbiased, tokens_bt) - expected).max() > 100 * max(error, 1e-6)
    if not model.config.rope_interleave:
        return
    reader = weights.SafetensorsReader(directory)
    reader.hf_config["rope_interleave"] = not model.config.rope_interleave
    swapped = weights.load_params(reader, config, shardings_of(config))
    assert np.abs(lm_logits(config, swapped, tokens_bt) - expected).max() > 100 * max(error, 1e-6)


def test_export_loads_in_transformers(deepseek, tmp_path):
    """lm -> HF: the tensors `save_params` writes (in small shards, so the index is used) with the config.json
    `hf_config_from` writes compute the original model's logits in transformers; rotate-half rotary pairs are
    written interleaved, the layout lm writes, and interleaved ones come back bit for bit."""
    directory, model, config, params = deepseek
    out = tmp_path / "exported"
    out.mkdir()
    files = weights.save_params(params, config, str(out), max_shard_bytes=20_000)
    assert len(files) > 1
    with open(f"{directory}/config.json") as f:
        base = json.load(f)
    (out / "config.json").write_text(json.dumps(architectures.hf_config_from(config, base)))
    original, exported = read_all(directory), read_all(out)
    assert sorted(exported) == sorted(original)
    if model.config.rope_interleave:
        for key, array in original.items():
            assert exported[key].dtype == array.dtype and np.array_equal(exported[key], array), key
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(reloaded).__name__ == "DeepseekV3ForCausalLM" and reloaded.config.rope_interleave
    tokens_bt = tokens(length=32, seed=1)
    np.testing.assert_allclose(hf_logits(reloaded.eval(), tokens_bt), hf_logits(model, tokens_bt), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_import_and_export_through_workdirs(tmp_path):
    """`import_checkpoint` -> lm workdir -> `export_checkpoint`: the same tensors, bit for bit."""
    directory, workdir, out = tmp_path / "model", str(tmp_path / "workdir"), str(tmp_path / "exported")
    save_deepseek(MODELS["q latent, dense then moe"][0], directory)
    config = convert.import_checkpoint(str(directory), workdir, FP32)
    assert lm_config.read_config(workdir).model.to_dict() == config.model.to_dict()
    convert.export_checkpoint(workdir, out)
    original, exported = read_all(directory), read_all(out)
    assert sorted(exported) == sorted(original)
    assert all(np.array_equal(exported[key], original[key]) for key in original)
    assert json.loads((tmp_path / "exported" / "config.json").read_text())["architectures"] == [
        architectures.DEEPSEEK_V3]


def test_import_on_a_2x2x2_mesh_equals_import_on_one_device(deepseek):
    """Each device reads its own slice: experts split over `expert`, the key/value latent (whose rotary part is
    permuted) over `tensor`, the rest over `fsdp` (ZeRO-3)."""
    directory, _, config, on_one = deepseek
    spread_config = config.copy_and_resolve_references()
    spread_config.update_from_flattened_dict({
        "mesh.expert": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "sharding.zero_stage": 3,
        "sharding.logical_axis_rules": (*config.sharding.logical_axis_rules, ("kv_lora", "tensor"))})
    on_eight, shardings = convert.load_params(directory, spread_config)
    assert shardings.mesh.devices.size == 8
    split = {jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(on_eight)
             if len(leaf.sharding.device_set) > 1 and not leaf.sharding.is_fully_replicated}
    assert any("'kv_a'" in path for path in split) and any("['mlp']['gate']" in path for path in split), split
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), on_eight, on_one)


def test_multi_token_prediction_layers_are_skipped(deepseek, tmp_path):
    """Real checkpoints carry `num_nextn_predict_layers` more layers (multi-token prediction) that transformers
    does not load: neither does lm; any other extra tensor is still refused."""
    from safetensors.numpy import save_file

    directory, model, _, _ = deepseek
    copy = tmp_path / "with_mtp"
    shutil.copytree(directory, copy)
    tensors = read_all(directory)
    extra = f"model.layers.{model.config.num_hidden_layers}."
    tensors.update({extra + "eh_proj.weight": np.ones((32, 64), np.float32),
                    extra + "mlp.experts.0.up_proj.weight": np.ones((16, 32), np.float32)})
    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    config = convert.config_for(str(copy))
    shardings = shardings_of(config)
    weights.check_tensors(weights.SafetensorsReader(str(copy)), config, shardings.abstract_params)
    hf_config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**hf_config, "num_nextn_predict_layers": 0}))
    with pytest.raises(lm_errors.CheckpointError, match=f"tensor '{extra}.*' has no place in lm's model"):
        weights.check_tensors(weights.SafetensorsReader(str(copy)), config, shardings.abstract_params)


@pytest.mark.parametrize("changes,expected", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 40.0, "rope_theta": 1e4, "mscale_all_dim": 1.0,
                          "original_max_position_embeddings": 4096}}, "rope scaling type 'yarn' is not supported"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4, "mscale_all_dim": 1.0}},
     "rope mscale_all_dim=1.0"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"dtype": "float8_e4m3fn"}, "weights of dtype 'float8_e4m3fn' are not supported"),
], ids=["yarn", "mscale", "activation", "fp8"])
def test_unsupported_deepseek_options_are_one_line_config_errors(changes, expected, tmp_path):
    hf_config = {"architectures": [architectures.DEEPSEEK_V3], "model_type": "deepseek_v3", "dtype": "float32",
                 **DEEPSEEK, **changes}
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    with pytest.raises(lm_errors.ConfigError) as raised:
        convert.config_for(str(tmp_path))
    assert expected in str(raised.value) and "\n" not in str(raised.value)


def test_every_dense_config_imports_as_a_dense_mla_model(tmp_path):
    hf_config = {"architectures": [architectures.DEEPSEEK_V3], "dtype": "float32", **DEEPSEEK,
                 "first_k_dense_replace": 3}
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    config = convert.config_for(str(tmp_path))
    assert config.model.attention_type == "mla" and config.model.moe.num_experts == 0
    assert architectures.hf_config_from(config)["first_k_dense_replace"] == 3
    names = {t.hf_name for t in architectures.tensors(config)}
    assert "model.layers.{layer}.mlp.gate_proj.weight" in names and not any("experts" in n for n in names)


@pytest.mark.parametrize("changes,expected", [
    ({"moe.capacity_factor": 1.25}, "config.model.moe.capacity_factor=1.25 has no Hugging Face architecture"),
    ({"moe.router": "softmax"}, "config.model.moe.router='softmax' has no Hugging Face architecture"),
    ({"mla.latent_norm_eps": 1e-5}, "config.model.mla.latent_norm_eps=1e-05 has no Hugging Face"),
    ({"attention_out_bias": True}, "config.model.attention_out_bias=True has no Hugging Face"),
    ({"attention_type": "mha"}, "with config.model.attention_type='mha' has no Hugging Face architecture"),
], ids=["capacity", "softmax router", "latent eps", "bias", "mha experts"])
def test_export_refuses_what_deepseek_v3_cannot_compute(changes, expected):
    config = lm_config.base_config()
    config.model.update(architectures.config_from_hf({"architectures": [architectures.DEEPSEEK_V3], **DEEPSEEK}))
    assert architectures.architecture_for(config) == architectures.DEEPSEEK_V3
    config.update_from_flattened_dict({f"model.{key}": value for key, value in changes.items()})
    with pytest.raises(lm_errors.ConfigError, match=expected):
        architectures.hf_config_from(config)
