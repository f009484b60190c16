"""The decoder-only Transformer, a Flax Linen module used functionally (`init` / `apply`).

Axis letters in names follow the package legend (`lm/__init__.py`): b batch, t positions, s key/value slots,
d d_model, n query heads, g key/value heads, h head dim, k rotary frequencies, f MLP hidden, v vocabulary, l layers.

    tokens_bt ─embed─▶ x_btd (+ learned / sinusoidal positions) ─▶ L × Block ─▶ final norm ─▶ hidden_btd

`Transformer.__call__` returns the final-normed hidden states; the LM head is not applied there. Training passes the
head's kernel (`Transformer.output_kernel`, `[d, v]`) to `lm.loss.cross_entropy`, which applies it chunk by chunk over
the vocabulary. Decoding (`lm.generate`) calls `Transformer.decode`, which runs new tokens against a `KVCache` and
returns logits for the last position only. Wherever logits are formed (`Transformer.logits`, the blockwise loss),
`config.model.logit_softcap` caps them the same way, so sampling draws from the distribution that was trained.

Every parameter is created through `nn.with_logical_partitioning` with the package's logical axis names
(`lm/__init__.py`: `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `vocab`, and `layers` for the scanned stack), so
the sharding rules in the config decide where each lives. `init` therefore returns `nn.Partitioned` boxes; `nn.get_partition_spec` reads
their logical names and `nn.unbox` gives plain arrays (`apply` accepts either).

A reward model (`config.finetune.objective = "reward"`, `lm.reward`) and a PPO policy's value function (`"ppo"`,
`lm.rl`) read one number per position from the same hidden states: the parameters `scalar_head [d]` and
`scalar_bias []`, both initialised to 0 (a new head scores every sequence alike), applied by `scalar_values` to
`Transformer.scalar_weights()`. Only runs with those objectives have them; `lm.peft` counts them among the
parameters a base model does not have.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from lm import attention as attention_lib
from lm import peft
from lm.config import head_dim, loreft_positions

Initializer = Any

# Standard deviation of a unit normal truncated to [-2, 2].
_TRUNCATED_NORMAL_STD = 0.87962566103423978

REMAT_POLICIES = {
    "full": None,  # Save nothing: recompute the whole block in the backward pass.
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def model_config(config: ml_collections.ConfigDict) -> ml_collections.FrozenConfigDict:
    """The hashable model section of a run config (accepts the whole config or `config.model`)."""
    section = config.model if "model" in config else config
    return ml_collections.FrozenConfigDict(section)


def _lora(peft_cfg, projection: str):
    """`config.finetune.lora` if the run puts a LoRA adapter on projections named `projection`, else None."""
    if peft_cfg is None or peft_cfg.method != "lora" or projection not in peft_cfg.lora.targets:
        return None
    return peft_cfg.lora


def _kernel_init(cfg, fan_in_axes: tuple[int, ...], fan_out_axes: tuple[int, ...], output_projection: bool):
    """Initializer for a projection kernel; axes are given so multi-axis kernels get the right fans.

    truncated_normal: std `init_std`, divided by sqrt(2 * num_layers) for projections that write into the residual
    stream (GPT-2 / Megatron depth scaling). xavier: Glorot uniform. he: Kaiming truncated normal on fan-in.
    """
    if cfg.init == "truncated_normal":
        std = cfg.init_std / math.sqrt(2 * cfg.num_layers) if output_projection else cfg.init_std
        # jax's `stddev` is that of the normal before truncation at +-2 sigma; divide so `init_std` is the real std.
        return nn.initializers.truncated_normal(stddev=std / _TRUNCATED_NORMAL_STD)
    if cfg.init == "xavier":
        return nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=fan_in_axes, out_axis=fan_out_axes)
    if cfg.init == "he":
        return nn.initializers.variance_scaling(
            2.0, "fan_in", "truncated_normal", in_axis=fan_in_axes, out_axis=fan_out_axes)
    raise ValueError(f"config.model.init={cfg.init!r} is not one of truncated_normal, xavier, he")


class Projection(nn.Module):
    """A linear map of the trailing axes: `x [..., *in] @ kernel [*in, *out] (+ bias) -> [..., *out]`.

    The kernel keeps its real shape (`kernel_shape = (*in, *out)`, e.g. `[d, n, h]`), so its initializer sees the
    right fans and every axis has a logical name. The product itself is one 2-D matmul `[rows, prod(in)] @
    [prod(in), prod(out)]` over all leading axes at once: with the leading axes kept apart (`einsum("btd,df->btf")`)
    XLA:CPU transposes activations in the backward pass around every dot (an MLP's forward and backward take 2.2x as
    long); a reshape that merges leading axes is free on every backend, and sharded leading axes merge in order.
    """

    cfg: ml_collections.FrozenConfigDict
    kernel_shape: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    fan_in_axes: tuple[int, ...]
    fan_out_axes: tuple[int, ...]
    output_projection: bool = False
    use_bias: bool = False
    lora: Any = None  # `config.finetune.lora` when this projection carries a LoRA adapter (`lm.peft`).

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        init = _kernel_init(cfg, self.fan_in_axes, self.fan_out_axes, self.output_projection)
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(init, self.kernel_axes), self.kernel_shape,
            jnp.dtype(cfg.param_dtype))
        in_shape, out_shape = self.kernel_shape[:len(self.fan_in_axes)], self.kernel_shape[len(self.fan_in_axes):]
        x_rows_in = x.reshape(-1, math.prod(in_shape))
        kernel_in_out = kernel.astype(cfg.dtype).reshape(math.prod(in_shape), math.prod(out_shape))
        y_rows_out = jnp.matmul(x_rows_in, kernel_in_out)
        if self.lora is not None:
            y_rows_out = y_rows_out + self._lora_update(x_rows_in, in_shape, out_shape)
        y = y_rows_out.reshape(*x.shape[:x.ndim - len(in_shape)], *out_shape)
        if self.use_bias:
            bias = self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros, self.kernel_axes[len(in_shape):]),
                out_shape, jnp.dtype(cfg.param_dtype))
            y = y + bias.astype(cfg.dtype)
        return y

    def _lora_update(self, x_rows_in: jax.Array, in_shape, out_shape) -> jax.Array:
        """LoRA (Hu et al. 2021): `(alpha / r) * dropout(x) A B`, `[rows, prod(out)]`. A `[*in, r]` and B `[r, *out]`
        keep the kernel's axis names beside `lora_rank`; their initialisation is `config.finetune.lora.init`
        (`lm.peft.lora_initializers`). Dropout is on only when the caller passes a `dropout` rng (training)."""
        cfg, lora, r = self.cfg, self.lora, self.lora.rank
        init_a, init_b = peft.lora_initializers(lora.init, len(in_shape), len(out_shape))
        n_in = len(in_shape)
        a = self.param("lora_a", nn.with_logical_partitioning(init_a, (*self.kernel_axes[:n_in], "lora_rank")),
                       (*in_shape, r), jnp.dtype(cfg.param_dtype))
        b = self.param("lora_b", nn.with_logical_partitioning(init_b, ("lora_rank", *self.kernel_axes[n_in:])),
                       (r, *out_shape), jnp.dtype(cfg.param_dtype))
        if lora.dropout > 0:
            x_rows_in = nn.Dropout(lora.dropout, deterministic=not self.has_rng("dropout"))(x_rows_in)
        a_in_rank = a.astype(cfg.dtype).reshape(-1, r)
        b_rank_out = b.astype(cfg.dtype).reshape(r, -1)
        return jnp.matmul(jnp.matmul(x_rows_in, a_in_rank), b_rank_out) * (lora.alpha / r)


class Norm(nn.Module):
    """RMSNorm or LayerNorm over the last (embed) axis, computed in fp32, returned in the compute dtype."""

    cfg: ml_collections.FrozenConfigDict

    @nn.compact
    def __call__(self, x_btd: jax.Array) -> jax.Array:
        cfg = self.cfg
        param_dtype = jnp.dtype(cfg.param_dtype)
        d = x_btd.shape[-1]
        x32 = x_btd.astype(jnp.float32)
        if cfg.norm == "layernorm":
            x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + cfg.norm_eps)
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (d,), param_dtype)
        y = x32 * scale.astype(jnp.float32)
        if cfg.norm == "layernorm":
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (d,), param_dtype)
            y = y + bias.astype(jnp.float32)
        return y.astype(cfg.dtype)


def rope_frequencies(cfg) -> jax.Array:
    """fp32 `[head_dim / 2]` angular frequency of each rotated pair: `rope_theta^(-2i/h)`, rescaled as
    `cfg.rope_scaling` says (the same numbers as Hugging Face's rotary embeddings of that type)."""
    h = head_dim(cfg)
    inv_freq_k = 1.0 / (cfg.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    scaling = cfg.rope_scaling
    if scaling.type == "linear":
        return inv_freq_k / scaling.factor
    if scaling.type == "llama3":
        # Long wavelengths (beyond the original context / low_freq_factor) are slowed by `factor`, short ones (below
        # original / high_freq_factor) kept, and those between interpolated smoothly in 1 / wavelength.
        wavelength_k = 2 * math.pi / inv_freq_k
        original = scaling.original_max_seq_len
        smooth_k = (original / wavelength_k - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor)
        interpolated_k = (1 - smooth_k) * inv_freq_k / scaling.factor + smooth_k * inv_freq_k
        long_k = wavelength_k > original / scaling.low_freq_factor
        medium_k = ~long_k & (wavelength_k >= original / scaling.high_freq_factor)
        scaled_k = jnp.where(long_k, inv_freq_k / scaling.factor, inv_freq_k)
        return jnp.where(medium_k, interpolated_k, scaled_k)
    return inv_freq_k


def rope(x_btnh: jax.Array, positions_bt: jax.Array, inv_freq_k: jax.Array) -> jax.Array:
    """Rotary position embedding (Su et al. 2021), rotate-half layout: pairs are (i, i + h/2).

    Rotates pair i by angle `position * inv_freq_k[i]` (`rope_frequencies`), so q.k depends only on the difference
    of positions. Angles are computed in fp32; the result keeps the dtype of `x_btnh`.
    """
    angles_btk = positions_bt.astype(jnp.float32)[..., None] * inv_freq_k
    sin_bt1k = jnp.sin(angles_btk)[:, :, None, :]
    cos_bt1k = jnp.cos(angles_btk)[:, :, None, :]
    x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos_bt1k - x2 * sin_bt1k, x2 * cos_bt1k + x1 * sin_bt1k], axis=-1)
    return rotated.astype(x_btnh.dtype)


def sinusoidal_positions(positions_bt: jax.Array, d: int) -> jax.Array:
    """Fixed sin/cos position encodings (Vaswani et al. 2017), `[b, t, d]` fp32; sin in the first half."""
    inv_freq_k = 10_000.0 ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d)
    angles_btk = positions_bt.astype(jnp.float32)[..., None] * inv_freq_k
    encoding_btd = jnp.concatenate([jnp.sin(angles_btk), jnp.cos(angles_btk)], axis=-1)
    return jnp.pad(encoding_btd, ((0, 0), (0, 0), (0, d % 2)))


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for decoding, written slot by slot.

    Rows of a batch are left-padded so all rows write the same slot at each step: row b's text starts at slot
    `start_b[b]`; slots before it are padding that no query attends to.

    key_lbsgh, value_lbsgh: `[layers, batch, max_len, kv_heads, head_dim]` in the compute dtype, logical axes
      `AXES` (sharded by the config's rules like every activation).
    index: int32 scalar, the number of slots written; the next token goes to slot `index`.
    start_b: int32 `[batch]`, the first slot of each row's text.
    prompt_end: int32 scalar, the slot after every row's prompt (slots before it hold the prompt, read by LoReFT runs
      that edit chosen positions of the prompt, `lm.peft`).
    """

    key_lbsgh: jax.Array
    value_lbsgh: jax.Array
    index: jax.Array
    start_b: jax.Array
    prompt_end: jax.Array

    AXES = ("layers", "batch", "length", "kv_heads", "head_dim")

    @classmethod
    def zeros(cls, cfg, start_b: jax.Array, max_len: int, prompt_end: int | None = None) -> "KVCache":
        """An empty cache for `len(start_b)` rows of up to `max_len` slots whose prompts end at slot `prompt_end`
        (default: every slot is prompt). `cfg`: `model_config(config)`."""
        shape = (cfg.num_layers, start_b.shape[0], max_len, cfg.num_kv_heads, head_dim(cfg))
        empty_lbsgh = nn.with_logical_constraint(jnp.zeros(shape, cfg.dtype), cls.AXES)
        return cls(empty_lbsgh, empty_lbsgh, jnp.zeros((), jnp.int32), start_b.astype(jnp.int32),
                   jnp.int32(max_len if prompt_end is None else prompt_end))

    def positions(self, length: int) -> jax.Array:
        """int32 `[batch, length]` positions of the next `length` tokens within their rows' text (0 on padding)."""
        slot_t = self.index + jnp.arange(length)
        return jnp.maximum(slot_t[None, :] - self.start_b[:, None], 0)


class Attention(nn.Module):
    """Causal self-attention with `num_kv_heads` key/value heads (MHA, GQA or MQA) and optional RoPE.

    With `layer_cache = (key_bsgh, value_bsgh, index, start_b)` (one layer of a `KVCache`), the new keys and values
    are written to slots `index + [0, t)` and the queries attend to the whole cache; the updated
    `(key_bsgh, value_bsgh)` are returned beside the output (None without a cache). `peft`: the frozen
    `config.finetune` section of a run with adapters (`lm.peft`: LoRA on the projections, gated prefixes), or None.
    """

    cfg: ml_collections.FrozenConfigDict
    peft: Any = None

    @nn.compact
    def __call__(self, x_btd, positions_bt, segment_ids_bt, layer_cache=None):
        cfg = self.cfg
        d, n, g, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, head_dim(cfg)
        project = functools.partial(Projection, cfg, fan_in_axes=(0,), fan_out_axes=(1, 2), use_bias=cfg.qkv_bias)
        q_btnh = project((d, n, h), ("embed", "heads", "head_dim"), name="query",
                         lora=_lora(self.peft, "query"))(x_btd)
        k_btgh = project((d, g, h), ("embed", "kv_heads", "head_dim"), name="key", lora=_lora(self.peft, "key"))(x_btd)
        v_btgh = project((d, g, h), ("embed", "kv_heads", "head_dim"), name="value",
                         lora=_lora(self.peft, "value"))(x_btd)
        if cfg.position_embedding == "rope":
            inv_freq_k = rope_frequencies(cfg)
            q_btnh = rope(q_btnh, positions_bt, inv_freq_k)
            k_btgh = rope(k_btgh, positions_bt, inv_freq_k)
        q_btnh = nn.with_logical_constraint(q_btnh, ("batch", "length", "heads", "head_dim"))
        k_btgh = nn.with_logical_constraint(k_btgh, ("batch", "length", "kv_heads", "head_dim"))
        v_btgh = nn.with_logical_constraint(v_btgh, ("batch", "length", "kv_heads", "head_dim"))
        if layer_cache is None:
            new_cache = None
            out_btnh = attention_lib.dot_product_attention(
                q_btnh, k_btgh, v_btgh, segment_ids_bt=segment_ids_bt, causal=True, implementation=cfg.attention,
                max_segments=cfg.attention_max_segments)
        else:
            key_bsgh, value_bsgh, index, start_b = layer_cache
            key_bsgh = jax.lax.dynamic_update_slice_in_dim(key_bsgh, k_btgh.astype(key_bsgh.dtype), index, axis=1)
            value_bsgh = jax.lax.dynamic_update_slice_in_dim(value_bsgh, v_btgh.astype(value_bsgh.dtype), index, 1)
            new_cache = (key_bsgh, value_bsgh)
            mask_b1ts = attention_lib.cache_attention_mask(start_b, index, x_btd.shape[1], key_bsgh.shape[1])
            # The XLA path: a few query rows against the cache is a small matrix-vector product, not flash-attention.
            out_btnh = attention_lib.dot_product_attention(
                q_btnh, key_bsgh, value_bsgh, causal=False, mask_b1ts=mask_b1ts, implementation="xla")
        if self.peft is not None and self.peft.method == "prefix":
            out_btnh = out_btnh + peft.Prefix(cfg, self.peft.prefix, h, name="prefix")(q_btnh)
        out_btnh = nn.with_logical_constraint(out_btnh, ("batch", "length", "heads", "head_dim"))
        out_btd = Projection(
            cfg, (n, h, d), ("heads", "head_dim", "embed"), fan_in_axes=(0, 1), fan_out_axes=(2,),
            output_projection=True, use_bias=cfg.attention_out_bias, name="out", lora=_lora(self.peft, "out"))(out_btnh)
        return out_btd, new_cache


class Mlp(nn.Module):
    """SwiGLU (`silu(x W_gate) * (x W_up) W_down`, Shazeer 2020) or GELU (tanh approximation, as GPT-2) MLP."""

    cfg: ml_collections.FrozenConfigDict
    peft: Any = None  # As `Attention.peft`.

    @nn.compact
    def __call__(self, x_btd):
        cfg = self.cfg
        d, f = cfg.d_model, cfg.mlp_dim
        up = functools.partial(
            Projection, cfg, (d, f), ("embed", "mlp"), (0,), (1,), use_bias=cfg.mlp_bias)
        if cfg.mlp_activation == "swiglu":
            h_btf = nn.silu(up(name="gate", lora=_lora(self.peft, "gate"))(x_btd)) * up(
                name="up", lora=_lora(self.peft, "up"))(x_btd)
        else:
            h_btf = nn.gelu(up(name="up", lora=_lora(self.peft, "up"))(x_btd), approximate=True)
        h_btf = nn.with_logical_constraint(h_btf, ("batch", "length", "mlp"))
        return Projection(
            cfg, (f, d), ("mlp", "embed"), (0,), (1,), output_projection=True, use_bias=cfg.mlp_bias,
            name="down", lora=_lora(self.peft, "down"))(h_btf)


class Block(nn.Module):
    """One Transformer layer: attention and MLP sublayers with residuals, pre-norm or post-norm.

    pre-norm:  x = x + attn(norm(x)); x = x + mlp(norm(x))
    post-norm: x = norm(x + attn(x)); x = norm(x + mlp(x))
    Signature `(carry, positions, segment_ids, kv (scanned), slots (broadcast), layer (scanned), reft (broadcast))
    -> (carry, new kv)` so it can be stacked with `nn.scan`; `kv = (key_bsgh, value_bsgh)` and
    `slots = (index, start_b)` are None unless decoding; `layer` is this layer's index (int32 scalar). A LoReFT run
    edits the output (`lm.peft.Reft`) at the tokens `reft_bt` marks (bool `[b, t]`; None: every token).
    """

    cfg: ml_collections.FrozenConfigDict
    peft: Any = None  # As `Attention.peft`.

    @nn.compact
    def __call__(self, x_btd, positions_bt, segment_ids_bt, kv=None, slots=None, layer=None, reft_bt=None):
        cfg = self.cfg
        attention = Attention(cfg, self.peft, name="attention")
        mlp = Mlp(cfg, self.peft, name="mlp")
        layer_cache = None if kv is None else (*kv, *slots)
        if cfg.norm_position == "pre":
            attended_btd, kv = attention(
                Norm(cfg, name="attention_norm")(x_btd), positions_bt, segment_ids_bt, layer_cache)
            x_btd = nn.with_logical_constraint(x_btd + attended_btd, ("batch", "length", "embed"))
            x_btd = x_btd + mlp(Norm(cfg, name="mlp_norm")(x_btd))
        else:
            attended_btd, kv = attention(x_btd, positions_bt, segment_ids_bt, layer_cache)
            x_btd = Norm(cfg, name="attention_norm")(x_btd + attended_btd)
            x_btd = nn.with_logical_constraint(x_btd, ("batch", "length", "embed"))
            x_btd = Norm(cfg, name="mlp_norm")(x_btd + mlp(x_btd))
        if self.peft is not None and self.peft.method == "loreft":
            layers = self.peft.loreft.layers
            on = jnp.isin(layer, jnp.asarray(layers, jnp.int32)) if layers else jnp.bool_(True)
            x_btd = peft.Reft(cfg, self.peft.loreft, name="reft")(x_btd, on, reft_bt)
        x_btd = nn.with_logical_constraint(x_btd, ("batch", "length", "embed"))
        return x_btd, kv


def _block_class(cfg) -> type[nn.Module]:
    """Block, wrapped in `nn.remat` with the configured checkpoint policy."""
    if cfg.remat_policy == "none":
        return Block
    # prevent_cse is unnecessary inside scan (the loop already stops CSE across the remat boundary).
    return nn.remat(Block, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)


class Transformer(nn.Module):
    """Decoder-only Transformer. `cfg` is `model_config(config)`: the frozen `config.model` section; `peft` the
    frozen `config.finetune` section of a run with adapters (`lm.peft`), else None."""

    cfg: ml_collections.FrozenConfigDict
    peft: Any = None
    has_scalar_head: bool = False  # A reward or value head (`scalar_head`): runs whose objective reads one.

    def setup(self):
        cfg = self.cfg
        param_dtype = jnp.dtype(cfg.param_dtype)
        self.embed = nn.Embed(
            cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=param_dtype,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(stddev=cfg.init_std), ("vocab", "embed")))
        if cfg.position_embedding == "learned":
            self.position_table = self.param(
                "position_table",
                nn.with_logical_partitioning(nn.initializers.normal(stddev=cfg.init_std), ("length", "embed")),
                (cfg.max_seq_len, cfg.d_model), param_dtype)
        block = _block_class(cfg)
        if cfg.scan_layers:
            self.layers = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast, 0, nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, self.peft, name="layers")
        else:
            self.layers = [block(cfg, self.peft, name=f"layers_{i}") for i in range(cfg.num_layers)]
        if cfg.norm_position == "pre":
            self.final_norm = Norm(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = self.param(
                "lm_head",
                nn.with_logical_partitioning(_kernel_init(cfg, (0,), (1,), False), ("embed", "vocab")),
                (cfg.d_model, cfg.vocab_size), param_dtype)
        if self.has_scalar_head:
            zeros = nn.initializers.zeros
            self.scalar_kernel = self.param(
                "scalar_head", nn.with_logical_partitioning(zeros, ("embed",)), (cfg.d_model,), jnp.float32)
            self.scalar_bias = self.param("scalar_bias", nn.with_logical_partitioning(zeros, ()), (), jnp.float32)

    def __call__(
        self,
        tokens_bt: jax.Array,
        positions_bt: jax.Array | None = None,
        segment_ids_bt: jax.Array | None = None,
        prompt_lengths_bt: jax.Array | None = None,
    ) -> jax.Array:
        """Hidden states of a batch of token sequences.

        Args:
          tokens_bt: int `[batch, length]` token ids.
          positions_bt: int `[batch, length]` position of each token within its document (default 0..length-1);
            packed rows restart at 0 per document, so RoPE and learned positions restart too.
          segment_ids_bt: int `[batch, length]` document id of each token in a packed row; attention stays within
            a document. None: one document per row.
          prompt_lengths_bt: int `[batch, length]` length of each token's document's prompt (`lm.peft.prompt_lengths`),
            read only by LoReFT runs that edit chosen positions of the prompt. None: every document is all prompt.

        Returns:
          `[batch, length, d_model]` final hidden states in the compute dtype (final-normed for pre-norm models;
          post-norm blocks already end in a norm).
        """
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
        if self._reft_positions() is not None and prompt_lengths_bt is None:
            prompt_lengths_bt = peft.prompt_lengths(segment_ids_bt, None, tokens_bt.shape)
        hidden_btd, _ = self._layers(tokens_bt, positions_bt, segment_ids_bt, prompt_lengths_bt, cache=None)
        return hidden_btd

    def decode(self, tokens_bt: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Runs `t` new tokens per row against `cache` (a prompt, then one token per step).

        Args:
          tokens_bt: int `[batch, t]`, written to cache slots `cache.index + [0, t)`.
          cache: the `KVCache` of everything before them.

        Returns:
          fp32 logits `[batch, vocab]` of the token after the last one (only that position's, never
          `[batch, t, vocab]`), and the cache with the new keys and values and `index` advanced by `t`.
        """
        length = tokens_bt.shape[1]
        prompt_lengths_bt = jnp.broadcast_to((cache.prompt_end - cache.start_b)[:, None], tokens_bt.shape)
        hidden_btd, (key_lbsgh, value_lbsgh) = self._layers(
            tokens_bt, cache.positions(length), None, prompt_lengths_bt, cache=cache)
        cache = cache.replace(key_lbsgh=key_lbsgh, value_lbsgh=value_lbsgh, index=cache.index + length)
        return self.logits(hidden_btd[:, -1]), cache

    def _reft_positions(self) -> tuple[int, int] | None:
        """`(first, last)` prompt tokens a LoReFT run edits (`lm.config.loreft_positions`); None: every token, or not
        a LoReFT run."""
        if self.peft is None or self.peft.method != "loreft":
            return None
        return loreft_positions(self.peft.loreft.positions)

    def _layers(self, tokens_bt, positions_bt, segment_ids_bt, prompt_lengths_bt, cache: KVCache | None):
        """Embedding, the blocks and the final norm: `(hidden_btd, (key_lbsgh, value_lbsgh) or None)`."""
        cfg = self.cfg
        first_last = self._reft_positions()
        reft_bt = None if first_last is None else peft.edit_mask(first_last, positions_bt, prompt_lengths_bt)
        x_btd = self.embed(tokens_bt)
        if cfg.position_embedding == "learned":
            x_btd = x_btd + jnp.take(self.position_table, positions_bt, axis=0).astype(cfg.dtype)
        elif cfg.position_embedding == "sinusoidal":
            x_btd = x_btd + sinusoidal_positions(positions_bt, cfg.d_model).astype(cfg.dtype)
        x_btd = nn.with_logical_constraint(x_btd, ("batch", "length", "embed"))
        kv_lbsgh = None if cache is None else (cache.key_lbsgh, cache.value_lbsgh)
        slots = None if cache is None else (cache.index, cache.start_b)
        if cfg.scan_layers:
            layer_l = jnp.arange(cfg.num_layers, dtype=jnp.int32)
            x_btd, kv_lbsgh = self.layers(x_btd, positions_bt, segment_ids_bt, kv_lbsgh, slots, layer_l, reft_bt)
        else:
            per_layer = []
            for i, layer in enumerate(self.layers):
                x_btd, kv = layer(x_btd, positions_bt, segment_ids_bt,
                                  None if cache is None else jax.tree.map(lambda a: a[i], kv_lbsgh), slots,
                                  jnp.int32(i), reft_bt)
                per_layer.append(kv)
            kv_lbsgh = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *per_layer)
        if kv_lbsgh is not None:
            kv_lbsgh = tuple(nn.with_logical_constraint(a, KVCache.AXES) for a in kv_lbsgh)
        if cfg.norm_position == "pre":
            x_btd = self.final_norm(x_btd)
        return nn.with_logical_constraint(x_btd, ("batch", "length", "embed")), kv_lbsgh

    def output_kernel(self) -> jax.Array:
        """The LM head `[d_model, vocab]` in the compute dtype (the transposed embedding when tied)."""
        kernel_dv = self.embed.embedding.T if self.cfg.tie_embeddings else self.lm_head
        return kernel_dv.astype(self.cfg.dtype)

    def scalar_weights(self) -> tuple[jax.Array, jax.Array]:
        """`(kernel_d, bias)` of the scalar head, fp32 (module docstring); for `scalar_values`."""
        return self.scalar_kernel, self.scalar_bias

    def logits(self, hidden_btd: jax.Array) -> jax.Array:
        """Logits `[..., vocab]` in fp32 for the given hidden states (decoding: only the positions it needs),
        soft-capped by `logit_softcap` when set."""
        logits_btv = jnp.einsum("...d,dv->...v", hidden_btd, self.output_kernel(), preferred_element_type=jnp.float32)
        return softcap(logits_btv, self.cfg.logit_softcap)


def softcap(logits: jax.Array, cap: float | None) -> jax.Array:
    """`cap * tanh(logits / cap)` (Gemma 2's final-logit soft-cap), or `logits` unchanged when `cap` is None."""
    return logits if cap is None else cap * jnp.tanh(logits / cap)


def scalar_values(hidden_btd: jax.Array, head: tuple[jax.Array, jax.Array]) -> jax.Array:
    """fp32 `[batch, length]`: the scalar head `(kernel_d, bias)` (`Transformer.scalar_weights`) at every position."""
    kernel_d, bias = head
    return jnp.einsum("btd,d->bt", hidden_btd.astype(jnp.float32), kernel_d.astype(jnp.float32)) + bias


# Objectives whose model has a scalar head: a reward model's score, a PPO policy's value.
SCALAR_HEAD_OBJECTIVES = ("reward", "ppo")


def build(config: ml_collections.ConfigDict) -> Transformer:
    """The Transformer for a run config (with the adapters of `config.finetune`, `lm.peft`, and the scalar head of
    the objectives that read one), or for a `model` section alone (neither)."""
    finetune = config.get("finetune")
    adapted = finetune is not None and peft.is_peft(config)
    return Transformer(model_config(config), ml_collections.FrozenConfigDict(finetune) if adapted else None,
                       has_scalar_head=finetune is not None and finetune.objective in SCALAR_HEAD_OBJECTIVES)


def init(model: Transformer, rng: jax.Array, batch_size: int = 1, length: int = 8):
    """Initial parameters, boxed in `nn.Partitioned` with logical axis names. Use under `jax.eval_shape` for shapes."""
    tokens_bt = jnp.zeros((batch_size, length), jnp.int32)
    return model.init(rng, tokens_bt)["params"]


def abstract_params(model: Transformer):
    """The parameters' shapes and dtypes (`jax.ShapeDtypeStruct`s, nothing allocated), still boxed in
    `nn.Partitioned` with their logical axis names: what `lm.sharding.Shardings` places."""
    return jax.eval_shape(lambda: init(model, jax.random.key(0)))
