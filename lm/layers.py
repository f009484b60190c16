"""The layers every model variant is built from: projections (with LoRA adapters), norms and the dense MLP.

Axis letters follow the package legend (`lm/__init__.py`). `cfg` is always the frozen `config.model` section
(`lm.model.model_config`). Every parameter is created through `nn.with_logical_partitioning` with the package's
logical axis names, so the sharding rules in the config decide where each lives. `lm.model` (attention, blocks, the
Transformer) and `lm.moe` (the experts) both build on these.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from lm import peft

# Standard deviation of a unit normal truncated to [-2, 2].
_TRUNCATED_NORMAL_STD = 0.87962566103423978

def lora(peft_cfg, projection: str):
    """`config.finetune.lora` if the run puts a LoRA adapter on projections named `projection`, else None."""
    if peft_cfg is None or peft_cfg.method != "lora" or projection not in peft_cfg.lora.targets:
        return None
    return peft_cfg.lora


def kernel_init(cfg, fan_in_axes: tuple[int, ...], fan_out_axes: tuple[int, ...], output_projection: bool):
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
        init = kernel_init(cfg, self.fan_in_axes, self.fan_out_axes, self.output_projection)
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
    """RMSNorm, LayerNorm or ScaleNorm over the last axis, computed in fp32, returned in the compute dtype.

    `kind` and `eps` default to `cfg.norm` and `cfg.norm_eps`; MLA's latent norms fix them (always RMSNorm, as
    DeepSeek). `axis` is the normalised axis' logical name. ScaleNorm (Nguyen & Salazar 2019) is `g * x / ||x||`
    with one learned scalar `g`, initialised to `sqrt(d)` so that it starts as an RMSNorm without a gain.
    """

    cfg: ml_collections.FrozenConfigDict
    kind: str | None = None
    eps: float | None = None
    axis: str = "embed"

    @nn.compact
    def __call__(self, x_btd: jax.Array) -> jax.Array:
        cfg = self.cfg
        kind = self.kind or cfg.norm
        eps = cfg.norm_eps if self.eps is None else self.eps
        param_dtype = jnp.dtype(cfg.param_dtype)
        d = x_btd.shape[-1]
        x32 = x_btd.astype(jnp.float32)
        if kind == "scalenorm":
            gain = self.param("scale", nn.with_logical_partitioning(nn.initializers.constant(math.sqrt(d)), ()), (),
                              param_dtype)
            # eps bounds the norm from below, as the paper's clamp, so a zero vector stays zero.
            norm_bt1 = jnp.maximum(jnp.linalg.norm(x32, axis=-1, keepdims=True), eps)
            return (x32 * (gain.astype(jnp.float32) / norm_bt1)).astype(cfg.dtype)
        if kind == "layernorm":
            x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis,)), (d,),
                           param_dtype)
        y = x32 * scale.astype(jnp.float32)
        if kind == "layernorm":
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axis,)), (d,),
                              param_dtype)
            y = y + bias.astype(jnp.float32)
        return y.astype(cfg.dtype)


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
            h_btf = nn.silu(up(name="gate", lora=lora(self.peft, "gate"))(x_btd)) * up(
                name="up", lora=lora(self.peft, "up"))(x_btd)
        else:
            h_btf = nn.gelu(up(name="up", lora=lora(self.peft, "up"))(x_btd), approximate=True)
        h_btf = nn.with_logical_constraint(h_btf, ("batch", "length", "mlp"))
        return Projection(
            cfg, (f, d), ("mlp", "embed"), (0,), (1,), output_projection=True, use_bias=cfg.mlp_bias,
            name="down", lora=lora(self.peft, "down"))(h_btf)
