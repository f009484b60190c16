"""The decoder-only Transformer, a Flax Linen module used functionally (`init` / `apply`).

Axis letters in names follow the package legend (`lm/__init__.py`): b batch, t positions, s key/value slots,
d d_model, n query heads, g key/value heads, h head dim, k rotary frequencies, f MLP hidden, v vocabulary, l layers.

    tokens_bt ─embed─▶ x_btd (+ learned / sinusoidal positions) ─▶ L × Block ─▶ final norm ─▶ hidden_btd

`Transformer.__call__` returns the final-normed hidden states; the LM head is not applied there. Training passes the
head's kernel (`Transformer.output_kernel`, `[d, v]`) to `lm.loss.cross_entropy`, which applies it chunk by chunk over
the vocabulary. Decoding (`lm.generate`) calls `Transformer.decode`, which runs new tokens against a `lm.kv_cache.KVCache` and
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

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from lm import attention as attention_lib
from lm import moe as moe_lib
from lm import peft
from lm.kv_cache import KVCache
from lm.layers import Mlp, Norm, Projection, kernel_init, lora
from lm.config import head_dim, loreft_positions

REMAT_POLICIES = {
    "full": None,  # Save nothing: recompute the whole block in the backward pass.
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def model_config(config: ml_collections.ConfigDict) -> ml_collections.FrozenConfigDict:
    """The hashable model section of a run config (accepts the whole config or `config.model`)."""
    section = config.model if "model" in config else config
    return ml_collections.FrozenConfigDict(section)


def rope_frequencies(cfg, rotary_dim: int | None = None) -> jax.Array:
    """fp32 `[rotary_dim / 2]` angular frequency of each rotated pair: `rope_theta^(-2i/h)`, rescaled as
    `cfg.rope_scaling` says (the same numbers as Hugging Face's rotary embeddings of that type). `rotary_dim`: the
    rotated width, by default the head dimension (MLA rotates only `mla.qk_rope_head_dim` of each head)."""
    h = head_dim(cfg) if rotary_dim is None else rotary_dim
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


def relative_buckets(query_index_t: jax.Array, key_index_s: jax.Array, num_buckets: int,
                     max_distance: int) -> jax.Array:
    """int32 `[t, s]`: T5's bucket of how far key s lies behind query t (causal: keys ahead share bucket 0).

    Distances below `num_buckets / 2` get a bucket each; longer ones share log-spaced buckets up to `max_distance`,
    and everything beyond it the last bucket (T5's `_relative_position_bucket` with `bidirectional=False`).
    """
    distance_ts = jnp.maximum(query_index_t[:, None] - key_index_s[None, :], 0)
    exact = num_buckets // 2
    log_ratio_ts = jnp.log(jnp.maximum(distance_ts, 1).astype(jnp.float32) / exact) / math.log(max_distance / exact)
    far_ts = exact + (log_ratio_ts * (num_buckets - exact)).astype(jnp.int32)
    return jnp.where(distance_ts < exact, distance_ts, jnp.minimum(far_ts, num_buckets - 1)).astype(jnp.int32)


def _attention_biases(cfg, bias_bnts, cached: bool):
    """The keyword arguments that add position biases to the scores. Against a cache, `bias_bnts` is the whole
    bias `[b, n, t, s]` of ALiBi or T5's relative positions (`Transformer._position_bias`, from each row's slots);
    in training, ALiBi's slopes (the kernels form its bias block by block) or the relative bias `[1, n, t, s]`."""
    if cached or cfg.position_embedding == "relative":
        return {} if bias_bnts is None else {"bias_1nts": bias_bnts}
    if cfg.position_embedding == "alibi":
        return {"alibi_slopes_n": attention_lib.alibi_slopes(cfg.num_heads)}
    return {}


class Attention(nn.Module):
    """Causal self-attention with `num_kv_heads` key/value heads (MHA, GQA or MQA), with RoPE, ALiBi or a relative
    bias (`bias_1nts`, T5's, computed once per forward by `Transformer`) as `config.model.position_embedding` says.

    With `layer_cache = (key, value, slots, layer)` (every layer's arrays of a `lm.kv_cache.KVCache`, contiguous or
    paged, its `Slots` and this layer's index), the new keys and values are written to layer `layer` at each row's
    slots `index_b + [0, t)` and the queries attend to the row's whole cache; the updated `(key, value)` are returned
    beside the output (None without a cache).
    `peft`: the frozen `config.finetune` section of a run with adapters (`lm.peft`: LoRA on the projections, gated
    prefixes), or None.
    """

    cfg: ml_collections.FrozenConfigDict
    peft: Any = None

    @nn.compact
    def __call__(self, x_btd, positions_bt, segment_ids_bt, layer_cache=None, bias_1nts=None):
        cfg = self.cfg
        d, n, g, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, head_dim(cfg)
        project = functools.partial(Projection, cfg, fan_in_axes=(0,), fan_out_axes=(1, 2), use_bias=cfg.qkv_bias)
        q_btnh = project((d, n, h), ("embed", "heads", "head_dim"), name="query",
                         lora=lora(self.peft, "query"))(x_btd)
        k_btgh = project((d, g, h), ("embed", "kv_heads", "head_dim"), name="key", lora=lora(self.peft, "key"))(x_btd)
        v_btgh = project((d, g, h), ("embed", "kv_heads", "head_dim"), name="value",
                         lora=lora(self.peft, "value"))(x_btd)
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
                max_segments=cfg.attention_max_segments,
                **_attention_biases(cfg, bias_1nts, cached=False))
        else:
            key_cache, value_cache, slots, layer = layer_cache
            new_cache = (slots.write(key_cache, layer, k_btgh), slots.write(value_cache, layer, v_btgh))
            key_bsgh, value_bsgh = slots.read(new_cache[0], layer), slots.read(new_cache[1], layer)
            # The XLA path: a few query rows against the cache is a small matrix-vector product, not flash-attention.
            out_btnh = attention_lib.dot_product_attention(
                q_btnh, key_bsgh, value_bsgh, causal=False, mask_b1ts=slots.mask(x_btd.shape[1], key_bsgh.shape[1]),
                implementation="xla", **_attention_biases(cfg, bias_1nts, cached=True))
        if self.peft is not None and self.peft.method == "prefix":
            out_btnh = out_btnh + peft.Prefix(cfg, self.peft.prefix, h, name="prefix")(q_btnh)
        out_btnh = nn.with_logical_constraint(out_btnh, ("batch", "length", "heads", "head_dim"))
        out_btd = Projection(
            cfg, (n, h, d), ("heads", "head_dim", "embed"), fan_in_axes=(0, 1), fan_out_axes=(2,),
            output_projection=True, use_bias=cfg.attention_out_bias, name="out", lora=lora(self.peft, "out"))(out_btnh)
        return out_btd, new_cache


class LatentAttention(nn.Module):
    """Multi-head latent attention (MLA, DeepSeek-V2 / V3): keys and values come from one compressed latent.

    Letters beyond the legend: c the key/value latent (`mla.kv_lora_rank`), e the latent plus the shared rotary key
    (`c + mla.qk_rope_head_dim`), q the query latent (`mla.q_lora_rank`), p the position-free part of a query/key
    head (`mla.qk_nope_head_dim`), o the rotary part (`mla.qk_rope_head_dim`), u a value head (`mla.v_head_dim`).

    Per token: `kv_a` maps x to the latent `[c]` (RMS-normed) and one rotary key `[o]` shared by every head; `kv_b`
    `[c, n, p + u]` expands the latent to each head's position-free key `[p]` and value `[u]`. Queries are
    `[n, p + o]`, straight from x (`query`) or through their own normed latent (`query_a`, `query_b`). Scores use
    `1/sqrt(p + o)`. Training runs the expanded form: ordinary attention over per-head keys and values.

    Decoding caches only the latent and the rotary key (`KVCache`: `e` numbers per token per layer). With
    `mla.absorb` the up-projections are absorbed: the query's position-free part is mapped into the latent space
    (`q_nope @ W_uk`), so attention is one shared head of width e over the cache (MQA, with the latent as value),
    and the latent output is mapped by `W_uv` to each head's value space before `out`. No per-head key or value
    exists at any step. Without `absorb`, the cache is expanded per head (the reference form).
    """

    cfg: ml_collections.FrozenConfigDict
    peft: Any = None

    @nn.compact
    def __call__(self, x_btd, positions_bt, segment_ids_bt, layer_cache=None, bias_1nts=None):
        del bias_1nts  # MLA carries positions in its rotary part only (config validation).
        cfg, mla = self.cfg, self.cfg.mla
        d, n = cfg.d_model, cfg.num_heads
        c, o, p, u = mla.kv_lora_rank, mla.qk_rope_head_dim, mla.qk_nope_head_dim, mla.v_head_dim
        latent_norm = functools.partial(Norm, cfg, kind="rmsnorm", eps=mla.latent_norm_eps)
        if mla.q_lora_rank:
            q_btq = Projection(cfg, (d, mla.q_lora_rank), ("embed", "q_lora"), (0,), (1,), use_bias=cfg.qkv_bias,
                               name="query_a")(x_btd)
            q_btq = latent_norm(axis="q_lora", name="query_norm")(q_btq)
            q_btnh = Projection(cfg, (mla.q_lora_rank, n, p + o), ("q_lora", "heads", "head_dim"), (0,), (1, 2),
                                name="query_b")(q_btq)
        else:
            q_btnh = Projection(cfg, (d, n, p + o), ("embed", "heads", "head_dim"), (0,), (1, 2), name="query",
                                lora=lora(self.peft, "query"))(x_btd)
        inv_freq_k = rope_frequencies(cfg, o)
        q_nope_btnp = q_btnh[..., :p]
        q_rope_btno = rope(q_btnh[..., p:], positions_bt, inv_freq_k)
        kv_bte = Projection(cfg, (d, c + o), ("embed", "kv_lora"), (0,), (1,), use_bias=cfg.qkv_bias,
                            name="kv_a")(x_btd)
        latent_btc = latent_norm(axis="kv_lora", name="kv_norm")(kv_bte[..., :c])
        k_rope_bt1o = rope(kv_bte[:, :, None, c:], positions_bt, inv_freq_k)
        kv_up_cnh = self.param(
            "kv_b", nn.with_logical_partitioning(kernel_init(cfg, (0,), (1, 2), False), ("kv_lora", "heads", "head_dim")),
            (c, n, p + u), jnp.dtype(cfg.param_dtype)).astype(cfg.dtype)
        if layer_cache is None:
            new_cache = None
            k_btnh, v_btnu = self._expand(latent_btc, k_rope_bt1o, kv_up_cnh)
            implementation = attention_lib.resolve_implementation(cfg.attention, cfg.dtype)
            if u > p + o:  # Only `xla` takes wider values (config validation; `auto` falls back to it).
                implementation = "xla"
            if implementation != "xla" and u < p + o:
                # The fused and blockwise kernels take one head width: zero value columns add zero outputs.
                v_btnu = jnp.pad(v_btnu, ((0, 0), (0, 0), (0, 0), (0, p + o - u)))
            out_btnu = attention_lib.dot_product_attention(
                jnp.concatenate([q_nope_btnp, q_rope_btno], -1), k_btnh, v_btnu, segment_ids_bt=segment_ids_bt,
                causal=True, implementation=implementation, max_segments=cfg.attention_max_segments)[..., :u]
        else:
            latent_cache, _, slots, layer = layer_cache
            new_latent = jnp.concatenate([latent_btc[:, :, None], k_rope_bt1o], -1)
            new_cache = (slots.write(latent_cache, layer, new_latent), None)
            cache_bs1e = slots.read(new_cache[0], layer)
            mask_b1ts = slots.mask(x_btd.shape[1], cache_bs1e.shape[1])
            if mla.absorb:
                q_latent_btnc = jnp.einsum("btnp,cnp->btnc", q_nope_btnp, kv_up_cnh[..., :p])
                # Scores must be scaled by 1/sqrt(p + o), the width of the expanded heads, not by the attention's own
                # 1/sqrt(e): scale the query by the ratio.
                q_btne = jnp.concatenate([q_latent_btnc, q_rope_btno], -1) * math.sqrt((c + o) / (p + o))
                out_latent_btnc = attention_lib.dot_product_attention(
                    q_btne.astype(cfg.dtype), cache_bs1e, cache_bs1e[..., :c], causal=False, mask_b1ts=mask_b1ts,
                    implementation="xla")
                out_btnu = jnp.einsum("btnc,cnu->btnu", out_latent_btnc, kv_up_cnh[..., p:])
            else:
                k_bsnh, v_bsnu = self._expand(cache_bs1e[:, :, 0, :c], cache_bs1e[:, :, :, c:], kv_up_cnh)
                out_btnu = attention_lib.dot_product_attention(
                    jnp.concatenate([q_nope_btnp, q_rope_btno], -1), k_bsnh, v_bsnu, causal=False,
                    mask_b1ts=mask_b1ts, implementation="xla")
        out_btnu = nn.with_logical_constraint(out_btnu.astype(cfg.dtype), ("batch", "length", "heads", "head_dim"))
        out_btd = Projection(
            cfg, (n, u, d), ("heads", "head_dim", "embed"), fan_in_axes=(0, 1), fan_out_axes=(2,),
            output_projection=True, use_bias=cfg.attention_out_bias, name="out", lora=lora(self.peft, "out"))(out_btnu)
        return out_btd, new_cache

    def _expand(self, latent_btc, k_rope_bt1o, kv_up_cnh):
        """Per-head keys `[b, t, n, p + o]` (each head's position-free key beside the shared rotary key) and values
        `[b, t, n, u]` from latents (the expanded form)."""
        p = self.cfg.mla.qk_nope_head_dim
        kv_btnh = jnp.einsum("btc,cnh->btnh", latent_btc, kv_up_cnh)
        k_rope_btno = jnp.broadcast_to(k_rope_bt1o, (*kv_btnh.shape[:3], k_rope_bt1o.shape[-1]))
        k_btnh = nn.with_logical_constraint(jnp.concatenate([kv_btnh[..., :p], k_rope_btno], -1),
                                            ("batch", "length", "heads", "head_dim"))
        return k_btnh, nn.with_logical_constraint(kv_btnh[..., p:], ("batch", "length", "heads", "head_dim"))


class Block(nn.Module):
    """One Transformer layer: attention and MLP sublayers with residuals, pre-norm or post-norm.

    pre-norm:  x = x + attn(norm(x)); x = x + mlp(norm(x))
    post-norm: x = norm(x + attn(x)); x = norm(x + mlp(x))
    Signature `((x, kv) (carried), positions, segment_ids, slots (broadcast), layer (scanned), reft (broadcast), bias
    (broadcast)) -> ((x, kv), moe stats)` so it can be stacked with `nn.scan`; `kv = (key_lbsgh, value_lbsgh)` is
    every layer's cache (`lm.kv_cache.KVCache`), carried whole so each layer writes its new entries in place (a
    scanned cache would be copied whole every step), and `slots` (`lm.kv_cache.Slots`); both are None unless
    decoding. `layer` is this layer's index (int32 scalar). A LoReFT run edits the output (`lm.peft.Reft`) at the
    tokens `reft_bt` marks (bool `[b, t]`; None: every token). `bias_1nts`: the position bias of
    `position_embedding = "relative"`, or of `"alibi"` against a cache (`Transformer._position_bias`; else None).
    With `moe`, the MLP is `lm.moe.MoeMlp` and its routing statistics come out as the scan's outputs (`{}` for a
    dense MLP); padding (segment id 0) is kept out of them.
    """

    cfg: ml_collections.FrozenConfigDict
    peft: Any = None  # As `Attention.peft`.
    moe: bool = False

    @nn.compact
    def __call__(self, carry, positions_bt, segment_ids_bt, slots=None, layer=None, reft_bt=None, bias_1nts=None):
        x_btd, kv = carry
        cfg = self.cfg
        attention_class = LatentAttention if cfg.attention_type == "mla" else Attention
        attention = functools.partial(attention_class(cfg, self.peft, name="attention"), bias_1nts=bias_1nts)
        if self.moe:
            real_bt = None if segment_ids_bt is None else segment_ids_bt != 0
            moe_mlp = moe_lib.MoeMlp(cfg, name="mlp")
            mlp = lambda x: moe_mlp(x, real_bt)
        else:
            dense_mlp = Mlp(cfg, self.peft, name="mlp")
            mlp = lambda x: (dense_mlp(x), {})
        layer_cache = None if kv is None else (*kv, slots, layer)
        if cfg.norm_position == "pre":
            attended_btd, kv = attention(
                Norm(cfg, name="attention_norm")(x_btd), positions_bt, segment_ids_bt, layer_cache)
            x_btd = nn.with_logical_constraint(x_btd + attended_btd, ("batch", "length", "embed"))
            mlp_btd, stats = mlp(Norm(cfg, name="mlp_norm")(x_btd))
            x_btd = x_btd + mlp_btd
        else:
            attended_btd, kv = attention(x_btd, positions_bt, segment_ids_bt, layer_cache)
            x_btd = Norm(cfg, name="attention_norm")(x_btd + attended_btd)
            x_btd = nn.with_logical_constraint(x_btd, ("batch", "length", "embed"))
            mlp_btd, stats = mlp(x_btd)
            x_btd = Norm(cfg, name="mlp_norm")(x_btd + mlp_btd)
        if self.peft is not None and self.peft.method == "loreft":
            layers = self.peft.loreft.layers
            on = jnp.isin(layer, jnp.asarray(layers, jnp.int32)) if layers else jnp.bool_(True)
            x_btd = peft.Reft(cfg, self.peft.loreft, name="reft")(x_btd, on, reft_bt)
        x_btd = nn.with_logical_constraint(x_btd, ("batch", "length", "embed"))
        return (x_btd, kv), stats


def layer_stacks(cfg) -> list[tuple[str, int, int, bool]]:
    """`(name, first layer, layers, moe)` of each run of alike layers: one `layers` stack, or with
    `moe.first_dense_layers` a `dense_layers` stack of dense MLPs before the mixture-of-experts `layers` (scanned
    stacks are homogeneous). Unscanned models name every layer `layers_{i}` instead."""
    total = cfg.num_layers
    dense = cfg.moe.first_dense_layers if cfg.moe.num_experts else total
    if dense in (0, total):
        return [("layers", 0, total, dense == 0)]
    return [("dense_layers", 0, dense, False), ("layers", dense, total - dense, True)]


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
            self.stacks = [nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast, nn.broadcast),
                length=count,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, self.peft, moe, name=name) for name, _, count, moe in layer_stacks(cfg)]
        else:
            self.stacks = [block(cfg, self.peft, moe, name=f"layers_{i}")
                           for _, first, count, moe in layer_stacks(cfg) for i in range(first, first + count)]
        if cfg.position_embedding == "relative":
            self.relative_bias = self.param(
                "relative_bias", nn.with_logical_partitioning(nn.initializers.normal(stddev=cfg.init_std),
                                                              (None, "heads")),
                (cfg.relative_buckets, cfg.num_heads), param_dtype)
        if cfg.norm_position == "pre":
            self.final_norm = Norm(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = self.param(
                "lm_head",
                nn.with_logical_partitioning(kernel_init(cfg, (0,), (1,), False), ("embed", "vocab")),
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

    def decode(self, tokens_bt: jax.Array, cache: KVCache, lengths_b: jax.Array | None = None,
               all_logits: bool = False) -> tuple[jax.Array, KVCache]:
        """Runs up to `t` new tokens per row against `cache` (a prompt or a chunk of one, a drafted run of tokens
        to verify, or one token per step).

        Args:
          tokens_bt: int `[batch, t]`, written to each row's cache slots `index_b + [0, t)`.
          cache: the `KVCache` of everything before them.
          lengths_b: int32 `[batch]`, how many of the t tokens of each row are real (default all): the row's write
            position advances by that many, so what follows overwrites the rest (a server batch mixing rows that
            prefill a chunk with rows that decode one token).
          all_logits: return the logits of every position (speculative verification), not just each row's last.

        Returns:
          fp32 logits `[batch, vocab]` of the token after each row's last real one (only that position's, never
          `[batch, t, vocab]`), or `[batch, t, vocab]` with `all_logits`; and the cache with the new keys and values
          and each row's `index_b` advanced.
        """
        batch, length = tokens_bt.shape
        slots = cache.slots
        prompt_lengths_bt = jnp.broadcast_to((cache.prompt_end - slots.start_b)[:, None], tokens_bt.shape)
        hidden_btd, (key_lbsgh, value_lbsgh) = self._layers(
            tokens_bt, slots.positions(length), None, prompt_lengths_bt, cache=cache)
        advance_b = jnp.full((batch,), length, jnp.int32) if lengths_b is None else lengths_b.astype(jnp.int32)
        cache = cache.replace(key_lbsgh=key_lbsgh, value_lbsgh=value_lbsgh).with_slots(
            index_b=slots.index_b + advance_b)
        if all_logits:
            return self.logits(hidden_btd), cache
        last_bd = jnp.take_along_axis(hidden_btd, (advance_b - 1)[:, None, None], axis=1)[:, 0]
        return self.logits(last_bd), cache

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
        slots = None if cache is None else cache.slots
        bias_1nts = self._position_bias(tokens_bt.shape[1], cache)
        stats = []  # Per stack (scanned) or per layer: the MoE layers' routing statistics.
        if cfg.scan_layers:
            for stack, (_, first, count, _) in zip(self.stacks, layer_stacks(cfg)):
                layer_l = jnp.arange(first, first + count, dtype=jnp.int32)
                (x_btd, kv_lbsgh), stack_stats = stack(
                    (x_btd, kv_lbsgh), positions_bt, segment_ids_bt, slots, layer_l, reft_bt, bias_1nts)
                stats.append(stack_stats)
        else:
            for i, layer in enumerate(self.stacks):
                (x_btd, kv_lbsgh), layer_stats = layer(
                    (x_btd, kv_lbsgh), positions_bt, segment_ids_bt, slots, jnp.int32(i), reft_bt, bias_1nts)
                stats.append(jax.tree.map(lambda a: a[None], layer_stats))
        moe_stats = [s for s in stats if s]
        if moe_stats:
            # Every MoE layer's statistics, `[moe layers, ...]`: what `moe_stats_of` reads after `apply`.
            self.sow("intermediates", "moe", jax.tree.map(lambda *a: jnp.concatenate(a), *moe_stats))
        if kv_lbsgh is not None:
            kv_lbsgh = jax.tree.map(lambda a: nn.with_logical_constraint(a, KVCache.axes(cfg, cache.is_paged)),
                                    kv_lbsgh)
        if cfg.norm_position == "pre":
            x_btd = self.final_norm(x_btd)
        return nn.with_logical_constraint(x_btd, ("batch", "length", "embed")), kv_lbsgh

    def _position_bias(self, length: int, cache: KVCache | None) -> jax.Array | None:
        """fp32 bias on the scores of every layer, by how far each key lies behind each query: T5's learned bias of
        each head by distance bucket (`relative_buckets`) `[1, n, t, t]` in training; against a cache, that or
        ALiBi's (`lm.attention.alibi_bias`) `[b, n, t, s]` from each row's own slots. None for other encodings (and
        ALiBi in training, which the attention kernels form from the slopes block by block).

        Distances are taken between slots, which equal distances between positions wherever attention is allowed:
        a packed row's documents never attend to each other, and a cache row's padding is never attended.
        """
        cfg = self.cfg
        if cfg.position_embedding not in ("relative", "alibi") or (cache is None and cfg.position_embedding == "alibi"):
            return None
        if cache is None:
            query_bt, key_s = jnp.arange(length)[None], jnp.arange(length)
        else:
            query_bt, key_s = cache.slots.query_slots(length), jnp.arange(cache.slot_count)
        if cfg.position_embedding == "alibi":
            slopes_n = attention_lib.alibi_slopes(cfg.num_heads)
            return jax.vmap(lambda query_t: attention_lib.alibi_bias(slopes_n, query_t, key_s))(query_bt)
        buckets_bts = jax.vmap(lambda query_t: relative_buckets(
            query_t, key_s, cfg.relative_buckets, cfg.relative_max_distance))(query_bt)
        bias_btsn = jnp.take(self.relative_bias.astype(jnp.float32), buckets_bts, axis=0)
        return jnp.transpose(bias_btsn, (0, 3, 1, 2))

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


def moe_stats_of(variables) -> dict[str, jax.Array]:
    """The routing statistics an `apply(..., mutable=["intermediates"])` of a mixture-of-experts model sowed, each
    stacked over its MoE layers (`lm.moe.MoeMlp`'s `stats`, `[moe layers, ...]`); `{}` for a dense model."""
    sown = variables.get("intermediates", {}).get("moe")
    return {} if sown is None else sown[0]


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
