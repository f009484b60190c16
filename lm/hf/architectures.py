"""Hugging Face architectures lm reads and writes: their config fields and where each weight goes.

Two tables per architecture, both pure data (no files are read here):

- `config_from_hf(hf_config)`: the lm `config.model` fields of a Hugging Face `config.json`, and
  `hf_config_from(config)` the reverse; an architecture, option or value lm cannot represent exactly is a
  `ConfigError` naming it.
- `tensors(config)`: one `TensorMap` per lm parameter, saying which Hugging Face tensor holds it and how the axes
  correspond; `lm.hf.weights` uses it both ways.

The layout rule, with `M` the Hugging Face tensor (transposed when `transpose`: torch `nn.Linear` stores
`[out, in]`, lm kernels are `[in, ...out]`; GPT-2's `Conv1D` already stores `[in, out]`), restricted to columns
`block` (GPT-2's fused query/key/value): the lm parameter of one layer is `M` reshaped, its first `split` axes
coming from `M`'s first axis and the rest from its second. A 1-D tensor (bias, norm) has every axis from its one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from lm import config as lm_config
from lm.errors import ConfigError

LLAMA_LIKE = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
GPT2 = "GPT2LMHeadModel"
ARCHITECTURES = (*LLAMA_LIKE, GPT2)
MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
               GPT2: "gpt2"}
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}

# Tensors some checkpoints carry that are not weights (causal-mask and RoPE buffers); skipped on import.
BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """Where one lm parameter lives in a Hugging Face checkpoint (module docstring for the layout rule).

    lm_path: the parameter's path in lm's tree, relative to a block for per-layer ones (`("attention", "query",
      "kernel")`) or from the root (`("embed", "embedding")`).
    hf_name: the Hugging Face tensor's name; per-layer ones hold `{layer}`.
    per_layer: whether there is one per layer (stacked on a leading `layers` axis when `scan_layers`).
    transpose: `M` is the Hugging Face tensor transposed (2-D only).
    split: how many of the lm parameter's (per-layer) axes come from `M`'s first axis.
    block: `(start, stop)` columns of `M`'s last axis that hold this parameter; None: all of them.
    """

    lm_path: tuple[str, ...]
    hf_name: str
    per_layer: bool
    transpose: bool = False
    split: int = 1
    block: tuple[int, int] | None = None


def _hf_value(hf_config: dict[str, Any], key: str, default=None):
    value = hf_config.get(key, default)
    return default if value is None else value


def architecture_of(hf_config: dict[str, Any], source: str) -> str:
    """The one architecture `hf_config` names; ConfigError unless lm supports it."""
    names = hf_config.get("architectures") or []
    if len(names) != 1:
        raise ConfigError(f"{source}: 'architectures' must name exactly one model class, got {names!r}")
    if names[0] not in ARCHITECTURES:
        raise ConfigError(f"{source}: architecture {names[0]!r} is not supported; lm reads {', '.join(ARCHITECTURES)}")
    return names[0]


def _rope_fields(hf_config: dict[str, Any], source: str) -> dict[str, Any]:
    """RoPE theta and scaling from either transformers 5's `rope_parameters` or the older top-level `rope_theta` and
    `rope_scaling` (whose type key is `rope_type`, or `type` in early files)."""
    parameters = dict(hf_config.get("rope_parameters") or {})
    scaling = dict(hf_config.get("rope_scaling") or {})
    theta = parameters.get("rope_theta", _hf_value(hf_config, "rope_theta", 10_000.0))
    merged = {**scaling, **parameters}
    kind = merged.get("rope_type", merged.get("type")) or "default"
    fields = {"rope_theta": float(theta)}
    if kind == "default":
        return fields
    if kind == "linear":
        fields["rope_scaling"] = {"type": "linear", "factor": float(merged["factor"])}
        return fields
    if kind == "llama3":
        fields["rope_scaling"] = {
            "type": "llama3", "factor": float(merged["factor"]),
            "low_freq_factor": float(merged["low_freq_factor"]), "high_freq_factor": float(merged["high_freq_factor"]),
            "original_max_seq_len": int(merged["original_max_position_embeddings"])}
        return fields
    raise ConfigError(f"{source}: rope scaling type {kind!r} is not supported; lm has default, linear and llama3")


def config_from_hf(hf_config: dict[str, Any], source: str = "config.json") -> dict[str, Any]:
    """lm `config.model` fields (a flat dict, `rope_scaling` nested) for a Hugging Face config; `source` names the
    file in errors."""
    architecture = architecture_of(hf_config, source)
    dtype = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    if dtype not in DTYPES:
        raise ConfigError(f"{source}: weights of dtype {dtype!r} are not supported; lm has {', '.join(DTYPES)}")
    if architecture == GPT2:
        return _gpt2_fields(hf_config, source) | {"param_dtype": DTYPES[dtype]}
    return _llama_fields(architecture, hf_config, source) | {"param_dtype": DTYPES[dtype]}


def _llama_fields(architecture: str, hf_config: dict[str, Any], source: str) -> dict[str, Any]:
    activation = hf_config.get("hidden_act", "silu")
    if activation != "silu":
        raise ConfigError(f"{source}: hidden_act={activation!r} is not supported; lm's SwiGLU MLP uses 'silu'")
    d, n = hf_config["hidden_size"], hf_config["num_attention_heads"]
    head_dim = _hf_value(hf_config, "head_dim", d // n)
    fields = {
        "vocab_size": hf_config["vocab_size"], "d_model": d, "num_layers": hf_config["num_hidden_layers"],
        "num_heads": n, "num_kv_heads": _hf_value(hf_config, "num_key_value_heads", n),
        "head_dim": None if head_dim * n == d else head_dim, "mlp_dim": hf_config["intermediate_size"],
        "max_seq_len": hf_config["max_position_embeddings"], "position_embedding": "rope", "norm": "rmsnorm",
        "norm_eps": float(hf_config.get("rms_norm_eps", 1e-6)), "norm_position": "pre", "mlp_activation": "swiglu",
        "tie_embeddings": bool(hf_config.get("tie_word_embeddings", False)),
        **_rope_fields(hf_config, source),
    }
    if architecture == "Qwen2ForCausalLM":
        fields.update(qkv_bias=True, attention_out_bias=False, mlp_bias=False)
    else:
        attention_bias = bool(hf_config.get("attention_bias", False))
        fields.update(qkv_bias=attention_bias, attention_out_bias=attention_bias,
                      mlp_bias=bool(hf_config.get("mlp_bias", False)))
    return fields


def _gpt2_fields(hf_config: dict[str, Any], source: str) -> dict[str, Any]:
    activation = hf_config.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ConfigError(f"{source}: activation_function={activation!r} is not supported; lm's GELU is the tanh "
                          f"approximation (gelu_new)")
    if hf_config.get("scale_attn_by_inverse_layer_idx") or not hf_config.get("scale_attn_weights", True):
        raise ConfigError(f"{source}: GPT-2 attention scaling options other than 1/sqrt(head_dim) are not supported")
    d = hf_config["n_embd"]
    return {
        "vocab_size": hf_config["vocab_size"], "d_model": d, "num_layers": hf_config["n_layer"],
        "num_heads": hf_config["n_head"], "num_kv_heads": hf_config["n_head"], "head_dim": None,
        "mlp_dim": _hf_value(hf_config, "n_inner", 4 * d), "max_seq_len": hf_config["n_positions"],
        "position_embedding": "learned", "norm": "layernorm", "norm_eps": float(hf_config["layer_norm_epsilon"]),
        "norm_position": "pre", "mlp_activation": "gelu", "tie_embeddings": bool(hf_config.get("tie_word_embeddings",
                                                                                                True)),
        "qkv_bias": True, "attention_out_bias": True, "mlp_bias": True,
    }


def check_sliding_window(hf_config: dict[str, Any], config: ml_collections.ConfigDict, source: str) -> None:
    """lm attends over the whole context: a model trained with a shorter sliding window (Mistral, Qwen2 with
    `use_sliding_window`) is refused, until lm has windowed attention, unless `max_seq_len` keeps every context
    inside the window."""
    windowed = hf_config.get("architectures") == ["MistralForCausalLM"] or hf_config.get("use_sliding_window")
    window = hf_config.get("sliding_window") if windowed else None
    if window is not None and window < config.model.max_seq_len:
        raise ConfigError(
            f"{source}: sliding_window={window} is shorter than config.model.max_seq_len={config.model.max_seq_len}; "
            f"lm has no sliding-window attention yet: set --config.model.max_seq_len={window} or less")


def architecture_for(config: ml_collections.ConfigDict) -> str:
    """The Hugging Face architecture that computes what lm's `config.model` does; ConfigError if none does."""
    m = config.model
    if (m.position_embedding, m.norm, m.mlp_activation, m.norm_position) == ("rope", "rmsnorm", "swiglu", "pre"):
        if m.qkv_bias and not m.attention_out_bias and not m.mlp_bias:
            return "Qwen2ForCausalLM"
        if m.qkv_bias == m.attention_out_bias:
            return "LlamaForCausalLM"
        raise ConfigError("config.model: these bias switches have no Hugging Face architecture (Llama: qkv_bias == "
                          "attention_out_bias; Qwen2: qkv_bias only)")
    gpt2 = ("learned", "layernorm", "gelu", "pre", True, True, True, m.num_heads, None)
    if (m.position_embedding, m.norm, m.mlp_activation, m.norm_position, m.qkv_bias, m.attention_out_bias,
            m.mlp_bias, m.num_kv_heads, m.head_dim) == gpt2 and m.tie_embeddings:
        return GPT2
    raise ConfigError(
        "config.model has no Hugging Face architecture: export needs rope/rmsnorm/swiglu/pre-norm (Llama, Qwen2) or "
        "learned positions/layernorm/gelu/pre-norm with every bias, MHA and tied embeddings (GPT-2)")


def hf_config_from(config: ml_collections.ConfigDict, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Hugging Face `config.json` of lm `config`'s model: `base` (the imported model's own file, so fields lm
    does not use, like token ids, survive) updated with every field lm decides."""
    architecture = architecture_for(config)
    if base and base.get("architectures") == ["MistralForCausalLM"] and architecture == "LlamaForCausalLM":
        architecture = "MistralForCausalLM"  # The same computation; keep the name it was imported with.
    m = config.model
    hf = {key: value for key, value in (base or {}).items()
          if key not in ("rope_scaling", "rope_theta", "rope_parameters", "torch_dtype")}
    hf.update(architectures=[architecture], model_type=MODEL_TYPES[architecture], vocab_size=m.vocab_size,
              dtype=m.param_dtype, tie_word_embeddings=m.tie_embeddings)
    if architecture == GPT2:
        hf.update(n_embd=m.d_model, n_layer=m.num_layers, n_head=m.num_heads, n_inner=m.mlp_dim,
                  n_positions=m.max_seq_len, layer_norm_epsilon=m.norm_eps, activation_function="gelu_new")
        return hf
    rope = {"rope_type": "default", "rope_theta": m.rope_theta}
    if m.rope_scaling.type == "linear":
        rope.update(rope_type="linear", factor=m.rope_scaling.factor)
    elif m.rope_scaling.type == "llama3":
        rope.update(rope_type="llama3", factor=m.rope_scaling.factor, low_freq_factor=m.rope_scaling.low_freq_factor,
                    high_freq_factor=m.rope_scaling.high_freq_factor,
                    original_max_position_embeddings=m.rope_scaling.original_max_seq_len)
    hf.update(hidden_size=m.d_model, num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
              num_key_value_heads=m.num_kv_heads, head_dim=lm_config.head_dim(m), intermediate_size=m.mlp_dim,
              max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps, hidden_act="silu",
              rope_parameters=rope, rope_theta=m.rope_theta,
              rope_scaling=None if m.rope_scaling.type == "none" else rope)
    if architecture == "LlamaForCausalLM":
        hf.update(attention_bias=m.qkv_bias, mlp_bias=m.mlp_bias)
    return hf


def tensors(config: ml_collections.ConfigDict) -> list[TensorMap]:
    """Every lm parameter of `config`'s model and the Hugging Face tensor holding it."""
    m = config.model
    if architecture_for(config) == GPT2:
        return _gpt2_tensors(m)
    layer = "model.layers.{layer}."
    maps = [
        TensorMap(("embed", "embedding"), "model.embed_tokens.weight", per_layer=False),
        TensorMap(("final_norm", "scale"), "model.norm.weight", per_layer=False),
        TensorMap(("attention_norm", "scale"), layer + "input_layernorm.weight", per_layer=True),
        TensorMap(("mlp_norm", "scale"), layer + "post_attention_layernorm.weight", per_layer=True),
        TensorMap(("attention", "out", "kernel"), layer + "self_attn.o_proj.weight", True, transpose=True, split=2),
    ]
    if not m.tie_embeddings:
        maps.append(TensorMap(("lm_head",), "lm_head.weight", per_layer=False, transpose=True))
    for lm_name, hf_name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        maps.append(TensorMap(("attention", lm_name, "kernel"), f"{layer}self_attn.{hf_name}.weight", True,
                              transpose=True))
        if m.qkv_bias:
            maps.append(TensorMap(("attention", lm_name, "bias"), f"{layer}self_attn.{hf_name}.bias", True, split=2))
    if m.attention_out_bias:
        maps.append(TensorMap(("attention", "out", "bias"), layer + "self_attn.o_proj.bias", True))
    for lm_name in ("gate", "up", "down"):
        maps.append(TensorMap(("mlp", lm_name, "kernel"), f"{layer}mlp.{lm_name}_proj.weight", True, transpose=True))
        if m.mlp_bias:
            maps.append(TensorMap(("mlp", lm_name, "bias"), f"{layer}mlp.{lm_name}_proj.bias", True))
    return maps


def _gpt2_tensors(m) -> list[TensorMap]:
    layer = "transformer.h.{layer}."
    width = m.num_heads * (m.d_model // m.num_heads)
    maps = [
        TensorMap(("embed", "embedding"), "transformer.wte.weight", per_layer=False),
        TensorMap(("position_table",), "transformer.wpe.weight", per_layer=False),
        TensorMap(("attention", "out", "kernel"), layer + "attn.c_proj.weight", True, split=2),
        TensorMap(("attention", "out", "bias"), layer + "attn.c_proj.bias", True),
        TensorMap(("mlp", "up", "kernel"), layer + "mlp.c_fc.weight", True),
        TensorMap(("mlp", "up", "bias"), layer + "mlp.c_fc.bias", True),
        TensorMap(("mlp", "down", "kernel"), layer + "mlp.c_proj.weight", True),
        TensorMap(("mlp", "down", "bias"), layer + "mlp.c_proj.bias", True),
    ]
    for lm_name, hf_name in (("final_norm", "transformer.ln_f"), ("attention_norm", layer + "ln_1"),
                             ("mlp_norm", layer + "ln_2")):
        per_layer = lm_name != "final_norm"
        maps += [TensorMap((lm_name, "scale"), hf_name + ".weight", per_layer),
                 TensorMap((lm_name, "bias"), hf_name + ".bias", per_layer)]
    for i, lm_name in enumerate(("query", "key", "value")):
        block = (i * width, (i + 1) * width)
        maps += [TensorMap(("attention", lm_name, "kernel"), layer + "attn.c_attn.weight", True, block=block),
                 TensorMap(("attention", lm_name, "bias"), layer + "attn.c_attn.bias", True, split=2, block=block)]
    return maps
