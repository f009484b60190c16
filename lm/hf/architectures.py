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
Two additions for DeepSeek-V3: `order` permutes the lm parameter's last axis (its interleaved rotary pairs), and
`experts` stacks one tensor per expert on the lm parameter's leading axis.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from lm import config as lm_config
from lm.errors import ConfigError

LLAMA_LIKE = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
GPT2 = "GPT2LMHeadModel"
DEEPSEEK_V3 = "DeepseekV3ForCausalLM"
ARCHITECTURES = (*LLAMA_LIKE, GPT2, DEEPSEEK_V3)
MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
               GPT2: "gpt2", DEEPSEEK_V3: "deepseek_v3"}
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}

# Tensors some checkpoints carry that are not weights (causal-mask and RoPE buffers); skipped on import.
BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")

# transformers' DeepseekV3Config defaults, for fields a config.json leaves out (None stands for the default too,
# except `q_lora_rank`, where None is a full-rank query projection).
DEEPSEEK_V3_DEFAULTS = {
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
    "n_routed_experts": 256, "num_experts_per_tok": 8, "n_shared_experts": 1, "moe_intermediate_size": 2048,
    "first_k_dense_replace": 3, "norm_topk_prob": True, "routed_scaling_factor": 2.5, "n_group": 8, "topk_group": 4,
    "rope_interleave": True, "attention_bias": False, "num_nextn_predict_layers": 1,
}
# Hugging Face's DeepseekV3RMSNorm of the query and key/value latents has this fixed epsilon.
DEEPSEEK_LATENT_NORM_EPS = 1e-6


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
    order: the lm parameter's last axis is the reshaped `M`'s, permuted: lm index `i` holds index `order[i]`
      (DeepSeek-V3's interleaved rotary pairs in lm's rotate-half layout); None: the same order.
    experts: the lm parameter's first (per-layer) axis indexes experts, expert `e` from its own tensor, `hf_name`
      with `{expert}` = e, laid out by the rule above for the remaining axes.
    layers: `(start, stop)` of the layers that have this parameter (DeepSeek-V3's dense MLPs, then mixture-of-experts
      ones); None: every layer.
    """

    lm_path: tuple[str, ...]
    hf_name: str
    per_layer: bool
    transpose: bool = False
    split: int = 1
    block: tuple[int, int] | None = None
    order: tuple[int, ...] | None = None
    experts: bool = False
    layers: tuple[int, int] | None = None


def _hf_value(hf_config: dict[str, Any], key: str, default=None):
    value = hf_config.get(key, default)
    return default if value is None else value


def skipped(name: str, hf_config: dict[str, Any]) -> bool:
    """Whether tensor `name` of a checkpoint with `config.json` `hf_config` is left unread on import: causal-mask and
    RoPE buffers, and DeepSeek-V3's multi-token-prediction modules (`num_nextn_predict_layers` more layers after the
    last, which transformers does not load either)."""
    if name.endswith(BUFFER_SUFFIXES):
        return True
    if hf_config.get("architectures") != [DEEPSEEK_V3]:
        return False
    first = hf_config.get("num_hidden_layers", 0)
    extra = _hf_value(hf_config, "num_nextn_predict_layers", DEEPSEEK_V3_DEFAULTS["num_nextn_predict_layers"])
    return any(name.startswith(f"model.layers.{first + i}.") for i in range(extra))


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
    if architecture == DEEPSEEK_V3:
        return _deepseek_fields(hf_config, source) | {"param_dtype": DTYPES[dtype]}
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


def _deepseek_fields(hf_config: dict[str, Any], source: str) -> dict[str, Any]:
    """DeepSeek-V3: multi-head latent attention (`attention_type="mla"`), and mixture-of-experts MLPs (sigmoid router
    with a score-correction bias, group-limited, dropless, shared experts) after `first_k_dense_replace` dense ones.
    `attention_bias` puts biases on q_a_proj, kv_a_proj_with_mqa and o_proj, where lm's `qkv_bias` (query_a, kv_a)
    and `attention_out_bias` (out) put them."""
    value = lambda key: _hf_value(hf_config, key, DEEPSEEK_V3_DEFAULTS[key])
    activation = hf_config.get("hidden_act", "silu")
    if activation != "silu":
        raise ConfigError(f"{source}: hidden_act={activation!r} is not supported; lm's SwiGLU MLP uses 'silu'")
    d, n, layers = hf_config["hidden_size"], hf_config["num_attention_heads"], hf_config["num_hidden_layers"]
    attention_bias = bool(value("attention_bias"))
    fields = {
        "vocab_size": hf_config["vocab_size"], "d_model": d, "num_layers": layers, "num_heads": n,
        "num_kv_heads": n,  # MLA expands the latent into every head's key and value.
        "head_dim": None, "mlp_dim": hf_config["intermediate_size"], "max_seq_len": hf_config["max_position_embeddings"],
        "position_embedding": "rope", "norm": "rmsnorm", "norm_eps": float(hf_config.get("rms_norm_eps", 1e-6)),
        "norm_position": "pre", "mlp_activation": "swiglu", "tie_embeddings": bool(hf_config.get("tie_word_embeddings",
                                                                                                False)),
        "qkv_bias": attention_bias, "attention_out_bias": attention_bias, "mlp_bias": False,
        "attention_type": "mla",
        "mla": {"q_lora_rank": hf_config.get("q_lora_rank", DEEPSEEK_V3_DEFAULTS["q_lora_rank"]) or 0,
                "kv_lora_rank": value("kv_lora_rank"), "qk_rope_head_dim": value("qk_rope_head_dim"),
                "qk_nope_head_dim": value("qk_nope_head_dim"), "v_head_dim": value("v_head_dim"),
                "latent_norm_eps": DEEPSEEK_LATENT_NORM_EPS},
        **_rope_fields(hf_config, source),
    }
    rope = {**(hf_config.get("rope_scaling") or {}), **(hf_config.get("rope_parameters") or {})}
    if fields.get("rope_scaling") and rope.get("mscale_all_dim"):
        raise ConfigError(f"{source}: rope mscale_all_dim={rope['mscale_all_dim']} (DeepSeek's rescaled attention "
                          f"scores) is not supported")
    first_dense, experts = value("first_k_dense_replace"), value("n_routed_experts")
    if first_dense >= layers or not experts:  # Every layer dense.
        fields["moe"] = {"num_experts": 0, "first_dense_layers": 0}
    else:
        fields["moe"] = {
            "num_experts": experts, "experts_per_token": value("num_experts_per_tok"),
            "shared_experts": value("n_shared_experts"), "expert_dim": value("moe_intermediate_size"),
            "first_dense_layers": first_dense, "router": "sigmoid", "normalize_top_k": bool(value("norm_topk_prob")),
            "routed_scaling": float(value("routed_scaling_factor")), "num_groups": value("n_group"),
            "top_groups": value("topk_group"), "capacity_factor": 0.0}  # Hugging Face's experts drop no token.
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
    if m.attention_type == "mla" or m.moe.num_experts:
        return _deepseek_architecture(m)
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


def _deepseek_architecture(m) -> str:
    """DeepSeek-V3 for MLA models (with or without experts); ConfigError naming the first field it cannot
    represent."""
    if m.attention_type != "mla":
        raise ConfigError("config.model.moe.num_experts > 0 with config.model.attention_type='mha' has no Hugging Face "
                          "architecture lm writes (DeepSeek-V3 has MLA attention)")
    wanted = {"position_embedding": "rope", "norm": "rmsnorm", "mlp_activation": "swiglu", "norm_position": "pre",
              "mlp_bias": False, "attention_out_bias": m.qkv_bias, "logit_softcap": None}
    if m.moe.num_experts:
        wanted.update({"moe.router": "sigmoid", "moe.capacity_factor": 0.0})
    wanted["mla.latent_norm_eps"] = DEEPSEEK_LATENT_NORM_EPS
    for field, value in wanted.items():
        got = m
        for key in field.split("."):
            got = got[key]
        if got != value:
            raise ConfigError(f"config.model.{field}={got!r} has no Hugging Face architecture: DeepSeek-V3 (MLA, "
                              f"mixture of experts) needs {value!r}")
    return DEEPSEEK_V3


def _hf_rope(m) -> dict[str, Any]:
    """The Hugging Face `rope_parameters` of lm's RoPE fields."""
    rope = {"rope_type": "default", "rope_theta": m.rope_theta}
    if m.rope_scaling.type == "linear":
        rope.update(rope_type="linear", factor=m.rope_scaling.factor)
    elif m.rope_scaling.type == "llama3":
        rope.update(rope_type="llama3", factor=m.rope_scaling.factor, low_freq_factor=m.rope_scaling.low_freq_factor,
                    high_freq_factor=m.rope_scaling.high_freq_factor,
                    original_max_position_embeddings=m.rope_scaling.original_max_seq_len)
    return rope


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
    rope = _hf_rope(m)
    hf.update(hidden_size=m.d_model, num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
              num_key_value_heads=m.num_kv_heads, head_dim=lm_config.head_dim(m), intermediate_size=m.mlp_dim,
              max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps, hidden_act="silu",
              rope_parameters=rope, rope_theta=m.rope_theta,
              rope_scaling=None if m.rope_scaling.type == "none" else rope)
    if architecture == "LlamaForCausalLM":
        hf.update(attention_bias=m.qkv_bias, mlp_bias=m.mlp_bias)
    if architecture == DEEPSEEK_V3:
        mla, moe = m.mla, m.moe
        hf.update(num_key_value_heads=m.num_heads, head_dim=mla.qk_rope_head_dim,  # As DeepseekV3Config sets it.
                  qk_head_dim=mla.qk_nope_head_dim + mla.qk_rope_head_dim, attention_bias=m.qkv_bias,
                  q_lora_rank=mla.q_lora_rank or None, kv_lora_rank=mla.kv_lora_rank,
                  qk_rope_head_dim=mla.qk_rope_head_dim, qk_nope_head_dim=mla.qk_nope_head_dim,
                  v_head_dim=mla.v_head_dim, rope_interleave=True,  # The layout `tensors` writes.
                  num_nextn_predict_layers=0)  # lm has no multi-token-prediction modules to write.
        if moe.num_experts:
            hf.update(n_routed_experts=moe.num_experts, num_experts_per_tok=moe.experts_per_token,
                      n_shared_experts=moe.shared_experts, moe_intermediate_size=moe.expert_dim,
                      first_k_dense_replace=moe.first_dense_layers, norm_topk_prob=moe.normalize_top_k,
                      routed_scaling_factor=moe.routed_scaling, n_group=moe.num_groups, topk_group=moe.top_groups)
        else:
            hf.update(first_k_dense_replace=m.num_layers)
    return hf


def tensors(config: ml_collections.ConfigDict, hf_config: dict[str, Any] | None = None) -> list[TensorMap]:
    """Every lm parameter of `config`'s model and the Hugging Face tensor holding it. `hf_config`: the checkpoint's
    `config.json` when reading one, for the layout options lm's config does not carry (DeepSeek-V3's
    `rope_interleave`); None: the layout lm writes."""
    m = config.model
    architecture = architecture_for(config)
    if architecture == GPT2:
        return _gpt2_tensors(m)
    if architecture == DEEPSEEK_V3:
        interleaved = _hf_value(hf_config or {}, "rope_interleave", DEEPSEEK_V3_DEFAULTS["rope_interleave"])
        return _deepseek_tensors(m, bool(interleaved))
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


def _rotary_order(before: int, rotary: int) -> tuple[int, ...]:
    """`TensorMap.order` of an axis of `before` position-free entries then `rotary` rotary ones in interleaved pairs
    (2i, 2i + 1) (DeepSeek-V3's `rope_interleave`): lm's rotate-half pairs (i, i + rotary / 2) take the even entries,
    then the odd ones. Scores are unchanged, queries and keys being permuted alike."""
    return (*range(before), *(before + i for i in range(0, rotary, 2)), *(before + i for i in range(1, rotary, 2)))


def _deepseek_tensors(m, interleaved: bool) -> list[TensorMap]:
    layer, mla = "model.layers.{layer}.", m.mla
    attention = layer + "self_attn."
    query_order = _rotary_order(mla.qk_nope_head_dim, mla.qk_rope_head_dim) if interleaved else None
    kv_order = _rotary_order(mla.kv_lora_rank, mla.qk_rope_head_dim) if interleaved else None
    maps = [
        TensorMap(("embed", "embedding"), "model.embed_tokens.weight", per_layer=False),
        TensorMap(("final_norm", "scale"), "model.norm.weight", per_layer=False),
        TensorMap(("attention_norm", "scale"), layer + "input_layernorm.weight", per_layer=True),
        TensorMap(("mlp_norm", "scale"), layer + "post_attention_layernorm.weight", per_layer=True),
        TensorMap(("attention", "kv_a", "kernel"), attention + "kv_a_proj_with_mqa.weight", True, transpose=True,
                  order=kv_order),
        TensorMap(("attention", "kv_norm", "scale"), attention + "kv_a_layernorm.weight", True),
        TensorMap(("attention", "kv_b"), attention + "kv_b_proj.weight", True, transpose=True),
        TensorMap(("attention", "out", "kernel"), attention + "o_proj.weight", True, transpose=True, split=2),
    ]
    if not m.tie_embeddings:
        maps.append(TensorMap(("lm_head",), "lm_head.weight", per_layer=False, transpose=True))
    if mla.q_lora_rank:
        maps += [
            TensorMap(("attention", "query_a", "kernel"), attention + "q_a_proj.weight", True, transpose=True),
            TensorMap(("attention", "query_norm", "scale"), attention + "q_a_layernorm.weight", True),
            TensorMap(("attention", "query_b", "kernel"), attention + "q_b_proj.weight", True, transpose=True,
                      order=query_order)]
    else:
        maps.append(TensorMap(("attention", "query", "kernel"), attention + "q_proj.weight", True, transpose=True,
                              order=query_order))
    if m.qkv_bias:  # Hugging Face's attention_bias: q_a_proj (not q_proj, q_b_proj), kv_a_proj_with_mqa, o_proj.
        maps.append(TensorMap(("attention", "kv_a", "bias"), attention + "kv_a_proj_with_mqa.bias", True,
                              order=kv_order))
        if mla.q_lora_rank:
            maps.append(TensorMap(("attention", "query_a", "bias"), attention + "q_a_proj.bias", True))
    if m.attention_out_bias:
        maps.append(TensorMap(("attention", "out", "bias"), attention + "o_proj.bias", True))
    moe = m.moe
    dense = (0, moe.first_dense_layers if moe.num_experts else m.num_layers)
    for name in ("gate", "up", "down") if dense[1] else ():
        maps.append(TensorMap(("mlp", name, "kernel"), f"{layer}mlp.{name}_proj.weight", True, transpose=True,
                              layers=dense))
    if not moe.num_experts:
        return maps
    routed = (dense[1], m.num_layers)
    maps += [TensorMap(("mlp", "router", "kernel"), layer + "mlp.gate.weight", True, transpose=True, layers=routed),
             TensorMap(("mlp", "router", "bias"), layer + "mlp.gate.e_score_correction_bias", True, layers=routed)]
    for name in ("gate", "up", "down"):
        maps.append(TensorMap(("mlp", name), layer + "mlp.experts.{expert}." + name + "_proj.weight", True,
                              transpose=True, experts=True, layers=routed))
        if moe.shared_experts:
            maps.append(TensorMap(("mlp", "shared", name, "kernel"), f"{layer}mlp.shared_experts.{name}_proj.weight",
                                  True, transpose=True, layers=routed))
    return maps
