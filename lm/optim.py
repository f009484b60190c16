"""The optimizer: an optax chain built from `config.optim`.

    apply_if_finite(clip_by_global_norm(grad_clip_norm) -> {adamw | lion | sgd+momentum | adafactor}(schedule,
                                                                                       masked weight decay))

- Schedule: linear warmup from 0 to `learning_rate` over `warmup_steps`, then cosine, linear or constant decay to
  `end_lr_ratio * learning_rate` at `total_steps`.
- Weight decay is decoupled (AdamW style) and masked off norm scales, biases, and (unless `decay_embeddings`) the
  token and position embeddings.
- The optimizer state takes the parameters' dtype: fp32 master weights and moments when `param_dtype=float32`,
  while the model computes in `config.model.dtype`.
- Gradient accumulation over `microbatches` happens inside the train step (`lm.train_step`), so one optimizer update
  is one step of the global batch.
- Non-finite gradients (a NaN or Inf anywhere) skip the update: `optax.apply_if_finite` leaves the parameters and
  the inner optimizer state as they were and counts the skip in its state (`notfinite_count`, consecutive;
  `total_notfinite`; `last_finite`). The trainer stops the run after `config.max_consecutive_skips` in a row,
  before optax would give up and apply one (`skip_counts` reads the counters).
"""

from __future__ import annotations

import jax
import ml_collections
import optax

from lm.errors import ConfigError

# Parameter names (last path element) that are never weight-decayed, and the embedding tables.
_NO_DECAY_NAMES = ("scale", "bias")
_EMBEDDING_NAMES = ("embedding", "position_table")


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Warmup then decay to the floor at `config.total_steps`."""
    o = config.optim
    peak, floor = o.learning_rate, o.learning_rate * o.end_lr_ratio
    warmup = min(o.warmup_steps, config.total_steps)
    decay_steps = max(config.total_steps - warmup, 1)
    if o.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=o.end_lr_ratio)
    elif o.schedule == "linear":
        decay = optax.linear_schedule(peak, floor, decay_steps)
    elif o.schedule == "constant":
        decay = optax.constant_schedule(peak)
    else:
        raise ConfigError(f"config.optim.schedule={o.schedule!r} is not one of cosine, linear, constant")
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def weight_decay_mask(params, decay_embeddings: bool = False):
    """Pytree of bools: True for leaves that get weight decay (projection kernels, the untied LM head)."""

    def decays(path, _):
        name = getattr(path[-1], "key", str(path[-1]))
        if name in _NO_DECAY_NAMES:
            return False
        if name in _EMBEDDING_NAMES:
            return decay_embeddings
        return True

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The optax transformation for `config.optim` (see the module docstring)."""
    o = config.optim
    schedule = learning_rate_schedule(config)
    mask = lambda params: weight_decay_mask(params, o.decay_embeddings)
    if o.optimizer == "adamw":
        core = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=mask)
    elif o.optimizer == "lion":
        core = optax.lion(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=mask)
    elif o.optimizer == "sgd":
        core = optax.chain(optax.add_decayed_weights(o.weight_decay, mask), optax.sgd(schedule, momentum=o.b1))
    elif o.optimizer == "adafactor":
        core = optax.adafactor(schedule, weight_decay_rate=o.weight_decay or None, weight_decay_mask=mask)
    else:
        raise ConfigError(f"config.optim.optimizer={o.optimizer!r} is not one of adamw, lion, sgd, adafactor")
    if o.grad_clip_norm > 0:
        core = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), core)
    return optax.apply_if_finite(core, max_consecutive_errors=config.max_consecutive_skips)


def skip_counts(opt_state: optax.ApplyIfFiniteState) -> dict[str, jax.Array]:
    """The non-finite guard's counters after an update, as fp32 metrics: `skipped` (1 if this update was dropped),
    `consecutive_skips` and `skipped_total` (over the whole run, resumes included)."""
    return {"skipped": 1.0 - opt_state.last_finite.astype("float32"),
            "consecutive_skips": opt_state.notfinite_count.astype("float32"),
            "skipped_total": opt_state.total_notfinite.astype("float32")}
