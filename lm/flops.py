"""Parameter and FLOP counting from a config alone (no initialisation), for reports and MFU.

Notation: V vocab_size, d d_model, L num_layers, n num_heads, g num_kv_heads, h head dim (`model.head_dim`, default d / n), f mlp_dim,
T sequence length.

Training FLOPs per token (forward + backward = 3 x forward, each multiply-add = 2 FLOPs):

    flops_per_token = 6 * N_matmul + 6 * L * n * h * (T + 1)

- `N_matmul` counts the weights of every matrix multiply a token goes through: per layer the query, key, value and
  output projections `d*n*h + 2*d*g*h + n*h*d` (MLA: its query (or query latent and up-projection), the latent
  projection `d*(c+o)`, the key/value up-projection `c*n*(p+u)` and the output `n*u*d`, letters as
  `lm.model.LatentAttention`) and the MLP (`3*d*f` SwiGLU, `2*d*f` GELU; a mixture of experts: the router `d*E`
  and the `k` experts a token is routed to plus the shared ones, the *active* parameters, while `param_count`
  counts all E), plus the LM head `d*V`
  (counted even when tied to the embedding: the multiply happens either way). The embedding lookup, learned
  positions, norms and biases are not matmuls and are not counted (the "non-embedding" convention of Kaplan et al.
  2020, with the output projection kept as in PaLM).
- The attention term counts causal attention once per visible (query, key) pair: query t sees t + 1 keys, so a
  sequence has T(T+1)/2 pairs, i.e. (T+1)/2 per token. Each pair costs `n*h` multiply-adds for the scores and `n*h`
  for the weighted values: forward 4*n*h*(T+1)/2 FLOPs per token per layer, times 3 for training. This is the work
  a causal flash-attention kernel actually does; PaLM's appendix convention (`12*L*n*h*T`, all T^2 pairs) is
  about twice as large and is available as `causal=False`.

Fine-tuning with adapters (`config.finetune.method` lora, prefix, loreft; `lm.peft`): the frozen base still runs
forward and passes gradients back to every layer's input, but computes no weight gradients, so its matmuls cost
`4 * N_matmul` per token, not 6; the adapters' own matmuls cost 6 per weight (`adapter_matmul_count`: LoRA's A and
B; the prefixes a token attends to, `2 * p * n * h` per layer, as a projection of that size; LoReFT's three
`[rank, d]` products). The attention term is unchanged.

DPO (`config.finetune.objective = "dpo"`, `lm.dpo`) also runs the reference model forward on every token: `2 *
N_matmul` more, and its forward attention term (a third of the training one), unless its log-probabilities are
precomputed with the data (`config.finetune.dpo.reference`). A reward model
(`"reward"`, `lm.reward`) never applies the LM head: `d*V` leaves `N_matmul`, and its scalar head's `d` weights
count as trained ones (6 FLOPs each).
"""

from __future__ import annotations

import ml_collections

from lm.config import head_dim


def _model(config: ml_collections.ConfigDict):
    return config.model if "model" in config else config


def _norm_params(m) -> int:
    return {"layernorm": 2 * m.d_model, "rmsnorm": m.d_model, "scalenorm": 1}[m.norm]


def _moe_layers(m) -> int:
    """How many layers have a mixture-of-experts MLP (`lm.model.layer_stacks`)."""
    return m.num_layers - m.moe.first_dense_layers if m.moe.num_experts else 0


def _attention_matrices(m) -> int:
    """Weights of one layer's attention projections: `d*n*h + 2*d*g*h + n*h*d`, or MLA's (module docstring)."""
    d, n = m.d_model, m.num_heads
    if m.attention_type == "mla":
        a = m.mla
        qk = a.qk_nope_head_dim + a.qk_rope_head_dim
        query = d * a.q_lora_rank + a.q_lora_rank * n * qk if a.q_lora_rank else d * n * qk
        return (query + d * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank * n * (a.qk_nope_head_dim
                + a.v_head_dim) + n * a.v_head_dim * d)
    g, h = m.num_kv_heads, head_dim(m)
    return d * n * h + 2 * d * g * h + n * h * d


def _attention_vectors(m) -> int:
    """One layer's attention biases and (MLA) latent norm scales."""
    d, n = m.d_model, m.num_heads
    if m.attention_type == "mla":
        a = m.mla
        query = a.q_lora_rank or n * (a.qk_nope_head_dim + a.qk_rope_head_dim)
        biases = (query + a.kv_lora_rank + a.qk_rope_head_dim) * m.qkv_bias + d * m.attention_out_bias
        return biases + a.q_lora_rank + a.kv_lora_rank
    g, h = m.num_kv_heads, head_dim(m)
    return (n * h + 2 * g * h) * m.qkv_bias + d * m.attention_out_bias


def _mlp_matrices(m, moe: bool, active: bool) -> int:
    """Weights of one layer's MLP matmuls: dense `3*d*f` (SwiGLU) or `2*d*f`; a mixture of experts' router `d*E`
    and its experts, all `E` of them (`active=False`: parameters) or the `k` a token goes through (FLOPs), plus
    the shared ones."""
    matrices = 3 if m.mlp_activation == "swiglu" else 2
    if not moe:
        return matrices * m.d_model * m.mlp_dim
    e = m.moe.experts_per_token if active else m.moe.num_experts
    return m.d_model * m.moe.num_experts + matrices * m.d_model * m.moe.expert_dim * (e + m.moe.shared_experts)


def _mlp_vectors(m, moe: bool) -> int:
    """One layer's MLP biases (dense, or the shared experts') and a router's balancing bias."""
    matrices = 3 if m.mlp_activation == "swiglu" else 2
    width = m.moe.expert_dim * m.moe.shared_experts if moe else m.mlp_dim
    biases = ((matrices - 1) * width + m.d_model) * m.mlp_bias if width else 0
    return biases + (m.moe.num_experts if moe else 0)


def layer_param_count(config: ml_collections.ConfigDict, moe: bool = False) -> int:
    """Parameters of one Transformer block (with a mixture-of-experts MLP when `moe`)."""
    m = _model(config)
    return (_attention_matrices(m) + _attention_vectors(m) + _mlp_matrices(m, moe, active=False)
            + _mlp_vectors(m, moe) + 2 * _norm_params(m))


def param_count(config: ml_collections.ConfigDict) -> int:
    """Exact number of parameters `lm.model.Transformer` creates for this config (every expert counted)."""
    m = _model(config)
    moe_layers = _moe_layers(m)
    total = (m.vocab_size * m.d_model + (m.num_layers - moe_layers) * layer_param_count(m)
             + moe_layers * layer_param_count(m, moe=True))
    if m.position_embedding == "learned":
        total += m.max_seq_len * m.d_model
    if m.position_embedding == "relative":
        total += m.relative_buckets * m.num_heads
    if m.norm_position == "pre":
        total += _norm_params(m)
    if not m.tie_embeddings:
        total += m.d_model * m.vocab_size
    return total


def active_param_count(config: ml_collections.ConfigDict) -> int:
    """Parameters one token's forward pass uses: `param_count` less the experts it is not routed to (every
    parameter for a dense model)."""
    m = _model(config)
    inactive = _mlp_matrices(m, True, active=False) - _mlp_matrices(m, True, active=True)
    return param_count(config) - _moe_layers(m) * inactive


def matmul_param_count(config: ml_collections.ConfigDict) -> int:
    """N_matmul of the module docstring: weights of the matmuls one token goes through, LM head included; of a
    mixture of experts only the router, the `experts_per_token` chosen experts and the shared ones (the active
    parameters)."""
    m = _model(config)
    moe_layers = _moe_layers(m)
    dense_mlp, moe_mlp = _mlp_matrices(m, False, active=True), _mlp_matrices(m, True, active=True)
    return (m.num_layers * _attention_matrices(m) + (m.num_layers - moe_layers) * dense_mlp + moe_layers * moe_mlp
            + m.d_model * m.vocab_size)


def adapter_matmul_count(config: ml_collections.ConfigDict) -> int:
    """The adapters' weights a token's matmuls go through (module docstring); 0 for full fine-tuning."""
    method = config.finetune.method if "finetune" in config else "full"
    m = config.model
    d, n, g, f, h = m.d_model, m.num_heads, m.num_kv_heads, m.mlp_dim, head_dim(m)
    if method == "lora":
        sizes = {"query": (d, n * h), "key": (d, g * h), "value": (d, g * h), "out": (n * h, d), "gate": (d, f),
                 "up": (d, f), "down": (f, d)}
        return m.num_layers * config.finetune.lora.rank * sum(sum(sizes[t]) for t in config.finetune.lora.targets)
    if method == "prefix":
        return m.num_layers * 2 * config.finetune.prefix.length * n * h
    if method == "loreft":
        return len(config.finetune.loreft.layers or range(m.num_layers)) * 3 * config.finetune.loreft.rank * d
    return 0


def attention_flops_per_token(config: ml_collections.ConfigDict, seq_len: int, causal: bool = True) -> float:
    """Training FLOPs per token of the attention scores and weighted values (module docstring)."""
    m = _model(config)
    visible_keys = (seq_len + 1) / 2 if causal else seq_len
    if m.attention_type == "mla":  # Scores over the expanded query/key width, values of their own width.
        widths = m.mla.qk_nope_head_dim + m.mla.qk_rope_head_dim + m.mla.v_head_dim
    else:
        widths = 2 * head_dim(m)
    return 3 * 2 * m.num_layers * m.num_heads * widths * visible_keys


def train_flops_per_token(config: ml_collections.ConfigDict, seq_len: int, causal: bool = True) -> float:
    """Training (forward + backward) FLOPs per token: `6 * N_matmul + attention term`, or with adapters
    `4 * N_matmul + 6 * adapter_matmul_count + attention term`, plus DPO's reference forward, without a reward
    model's LM head (module docstring). Remat recompute excluded."""
    adapters = adapter_matmul_count(config)
    objective = config.finetune.objective if "finetune" in config else "lm"
    matmuls = matmul_param_count(config)
    if objective == "reward":  # The LM head is never applied; the scalar head is a [d] product that trains.
        m = _model(config)
        matmuls -= m.d_model * m.vocab_size
        adapters += m.d_model
    base = (4 if adapter_matmul_count(config) else 6) * matmuls
    attention = attention_flops_per_token(config, seq_len, causal)
    runs_reference = objective == "dpo" and config.finetune.dpo.reference == "model"
    reference = 2 * matmul_param_count(config) + attention / 3 if runs_reference else 0
    return base + 6 * adapters + attention + reference


# Peak dense bf16 FLOP/s of one device (one chip / one GPU), from the vendors' datasheets (without sparsity):
# NVIDIA H100 SXM 989.4 TFLOP/s and H100 PCIe 756 (H100 datasheet), H200 989.4 (H200 datasheet: same Hopper tensor
# cores), A100 312 (A100 datasheet); Google Cloud TPU docs: v4 275, v5e 197, v5p 459, v6e (Trillium) 918.
# Keys are matched as substrings of `jax.Device.device_kind`, most specific first.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989.4e12),
    ("H200", 989.4e12),
    ("A100", 312e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),
    ("TPU v6e", 918e12),
)


GiB = 2 ** 30

# Memory (HBM) of one device in bytes, the vendors' nominal capacities, which are GiB: NVIDIA H100 80 GB (SXM and
# PCIe; nvidia-smi shows 81,559 MiB), H200 141 GB, A100 40 GB and 80 GB (datasheets); Google Cloud TPU docs: v4 32 GiB,
# v5e 16 GB, v5p 95 GB, v6e 32 GB. What a program can use is less: JAX's GPU allocator takes
# XLA_PYTHON_CLIENT_MEM_FRACTION of it (0.75 unless set), and runtimes reserve some. Matched like PEAK_BF16_FLOPS.
HBM_BYTES = (
    ("H100", 80 * GiB),
    ("H200", 141 * GiB),
    ("A100-SXM4-40GB", 40 * GiB),
    ("A100-PCIE-40GB", 40 * GiB),
    ("A100", 80 * GiB),
    ("TPU v4", 32 * GiB),
    ("TPU v5 lite", 16 * GiB),
    ("TPU v5e", 16 * GiB),
    ("TPU v5p", 95 * GiB),
    ("TPU v5", 95 * GiB),
    ("TPU v6 lite", 32 * GiB),
    ("TPU v6e", 32 * GiB),
)


# Memory bandwidth of one device in bytes/s, from the same datasheets: H100 SXM 3.35 TB/s, H100 PCIe 2.0, H200 4.8,
# A100 40 GB 1.555 and 80 GB 2.039 (SXM); Google Cloud TPU docs: v4 1,228 GB/s, v5e 819, v5p 2,765, v6e 1,640.
# Decoding one token per row reads every parameter and the KV cache once: the bound batch-1 decoding runs at.
HBM_BYTES_PER_SECOND = (
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),
    ("H200", 4.8e12),
    ("A100-SXM4-40GB", 1.555e12),
    ("A100-PCIE-40GB", 1.555e12),
    ("A100", 2.039e12),
    ("TPU v4", 1.228e12),
    ("TPU v5 lite", 0.819e12),
    ("TPU v5e", 0.819e12),
    ("TPU v5p", 2.765e12),
    ("TPU v5", 2.765e12),
    ("TPU v6 lite", 1.64e12),
    ("TPU v6e", 1.64e12),
)


def _lookup(table, device_kind: str):
    """The value of the first key in `table` that is a substring of `device_kind` (case-insensitive), or None."""
    for key, value in table:
        if key.lower() in device_kind.lower():
            return value
    return None


def device_peak_flops(device_kind: str) -> float | None:
    """Datasheet peak dense bf16 FLOP/s for a device kind, or None when the kind is not in the table."""
    return _lookup(PEAK_BF16_FLOPS, device_kind)


def device_memory_bytes(device_kind: str) -> int | None:
    """Nominal memory of one device of this kind in bytes (`HBM_BYTES`), or None when the kind is not in the table."""
    return _lookup(HBM_BYTES, device_kind)


def device_memory_bandwidth(device_kind: str) -> float | None:
    """Datasheet memory bandwidth of one device of this kind in bytes/s (`HBM_BYTES_PER_SECOND`), or None."""
    return _lookup(HBM_BYTES_PER_SECOND, device_kind)


def measure_matmul_flops(dtype="float32", size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large square matmul on the default device (median of `repeats`), the CPU stand-in for a peak."""
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * size ** 3 / float(np.median(times))


def peak_flops(devices, dtype="bfloat16") -> tuple[float, str]:
    """Total peak FLOP/s of `devices` and a label saying where the figure comes from.

    Accelerators: datasheet bf16 peak per device times the number of devices. CPU (and unknown kinds): one measured
    matmul in the compute dtype; simulated CPU devices share the same cores, so the measured figure is the total.
    """
    kind = devices[0].device_kind
    per_device = device_peak_flops(kind)
    if per_device is not None and devices[0].platform != "cpu":
        return per_device * len(devices), f"{len(devices)} x {kind} datasheet bf16 peak"
    return measure_matmul_flops(dtype), f"measured {dtype} matmul peak of this {devices[0].platform}"


def mfu(flops_per_token: float, tokens_per_second: float, peak: float) -> float:
    """Model FLOPs utilisation: `flops_per_token * tokens_per_second / peak` (model FLOPs only, remat excluded)."""
    return flops_per_token * tokens_per_second / peak
