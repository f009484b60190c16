"""The train state and the sharded, jitted train step.

    batch ─▶ [micro-batches, lax.scan] ─▶ the objective (`config.finetune.objective`: lm.objective.lm_loss, model.apply
          then the blockwise cross-entropy; on preference pairs lm.dpo.dpo_loss or lm.reward.reward_loss)
          ─▶ grads (constrained to the ZeRO-stage sharding) ─▶ optax update (dropped if not finite) ─▶ new state

`make_train_step` returns `jax.jit(step, in_shardings, out_shardings, donate_argnums=0)` whose shardings come from
`lm.sharding.Shardings`; XLA's partitioner turns them into the collectives of the chosen ZeRO stage. Batches are as
`lm.objective` describes them.

What trains is `config.finetune.method`'s choice (`lm.peft`): every parameter (`full`), or only the adapters of a
`lora` / `prefix` / `loreft` run. The state holds the trainable parameters and their optimizer state; the frozen
base is the step's third argument (`step(state, batch, frozen)`: `{}` for full training, the reference copy for
full-parameter DPO), never donated, copied or given optimizer state, and gradients are taken with respect to the
trainable tree alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from lm import config as lm_config
from lm import dpo
from lm import model as model_lib
from lm import moe as moe_lib
from lm import objective
from lm import optim
from lm import peft
from lm import ppo
from lm import reward
from lm import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
    """Everything a step updates, as one pytree orbax can save: step counter, parameters, optimizer state."""

    step: jax.Array  # int32 scalar: number of steps taken (skipped ones included).
    params: Any  # The trainable parameters: all of them, or a PEFT run's adapters (`lm.peft`).
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class Training:
    """What a config needs before the first step: mesh, model, optimizer and every sharding."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    model: model_lib.Transformer
    optimizer: optax.GradientTransformation
    shardings: sharding_lib.Shardings

    def init_state(self) -> TrainState:
        return init_train_state(self.config, self.model, self.optimizer, self.shardings,
                                jax.random.key(self.config.seed))

    def state_from(self, params) -> TrainState:
        """A fresh train state (step 0, new optimizer state) around `params` placed by `shardings.trainable` (full
        fine-tuning from `config.init_from`; a PEFT run starts new adapters with `init_state`). `params` is a base
        model's tree (`lm.init_from.initial_params`), so a reward or value model's scalar head (`lm.model`) is added
        here at its initialisation, zeros."""
        new_heads = peft.split(self.shardings.abstract_trainable)[1]

        def init(params):
            params = peft.combine(params, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), new_heads))
            return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.optimizer.init(params))

        return jax.jit(init, out_shardings=state_shardings(self.shardings))(params)

    def abstract_state(self) -> TrainState:
        """`ShapeDtypeStruct`s of the train state with their shardings (no allocation): the restore target."""
        params = self.shardings.abstract_trainable
        shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                            opt_state=jax.eval_shape(self.optimizer.init, params))
        return sharding_lib.abstract_arrays(shapes, state_shardings(self.shardings))

    def abstract_frozen(self):
        """`ShapeDtypeStruct`s (with shardings) of the step's frozen argument: a PEFT run's base, else `{}`."""
        return sharding_lib.abstract_arrays(self.shardings.abstract_frozen, self.shardings.frozen)

    def train_step(self):
        return make_train_step(self.config, self.model, self.optimizer, self.shardings)


def build(config: ml_collections.ConfigDict, devices=None) -> Training:
    """Validates `config` against the devices (clear errors before any compile) and builds its `Training`."""
    lm_config.validate(config)
    mesh = sharding_lib.make_mesh(config.mesh, devices)
    sharding_lib.check_divisibility(config, mesh)
    optimizer = optim.make_optimizer(config)
    model = model_lib.build(config)
    return Training(config, mesh, model, optimizer, sharding_lib.model_shardings(config, mesh, optimizer, model))


def state_shardings(shardings: sharding_lib.Shardings) -> TrainState:
    return TrainState(step=shardings.replicated, params=shardings.trainable, opt_state=shardings.opt_state)


def init_train_state(config, model, optimizer, shardings: sharding_lib.Shardings, rng: jax.Array) -> TrainState:
    """Initialises the trainable parameters and their optimizer state directly in their shardings (no full copy on
    one device; a PEFT run's base initialisation is dead code XLA drops)."""

    def init(rng):
        params = peft.trainable(nn.unbox(model_lib.init(model, rng)), config)[1]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))

    return jax.jit(init, out_shardings=state_shardings(shardings))(rng)


def _split_microbatches(batch, microbatches: int, batch_sharding: NamedSharding, group: int = 1):
    """`[b, t]` -> `[m, b/m, t]` with the `group` rows of group `i*m + j` in micro-batch j, so each device's rows
    stay on that device and a group (a preference pair: `group` 2) stays whole."""

    def split(x_bt):
        x_bmgt = x_bt.reshape(x_bt.shape[0] // (microbatches * group), microbatches, group, *x_bt.shape[1:])
        x_mbt = jnp.swapaxes(x_bmgt, 0, 1).reshape(microbatches, x_bt.shape[0] // microbatches, *x_bt.shape[1:])
        spec = P(None, *batch_sharding.spec)
        return jax.lax.with_sharding_constraint(x_mbt, NamedSharding(batch_sharding.mesh, spec))

    return jax.tree.map(split, batch)


def objective_loss(config: ml_collections.ConfigDict, model: model_lib.Transformer):
    """`loss(trainable, frozen, batch, rng) -> (loss, aux)` of `config.finetune.objective`; `aux["weight_sum"]` is
    what the loss is a mean over (trained tokens; DPO and reward models: pairs), the other entries are the step's
    metrics."""
    if config.finetune.objective == "dpo":
        reference_model = model_lib.build(peft.base_config(config))
        return lambda p, frozen, batch, rng: dpo.dpo_loss(p, frozen, batch, model, reference_model, config, rng)
    if config.finetune.objective == "reward":
        return lambda p, frozen, batch, rng: reward.reward_loss(p, frozen, batch, model, config, rng)
    if config.finetune.objective == "ppo":  # A minibatch of a rollout (`lm.rl`).
        return lambda p, frozen, batch, rng: ppo.ppo_loss(p, frozen, batch, model, config, rng)

    def lm_loss(p, frozen, batch, rng):
        loss, aux = objective.lm_loss(peft.combine(frozen, p), batch, model, config, rng=rng)
        return loss, {name: value for name, value in aux.items()
                      if name in ("nll", "z_loss", "accuracy", "weight_sum") or name.startswith("moe/")}

    return lm_loss


def _loss_and_grads(params, frozen, batch, model, config, shardings: sharding_lib.Shardings, rng):
    """Loss, aux and gradients (with respect to the trainable `params`, beside the `frozen` ones) of the global
    batch; with `config.optim.microbatches` > 1 accumulated in fp32 over sequential micro-batches, each weighted by
    its `aux["weight_sum"]` (tokens; DPO: pairs), so the result equals one pass over the whole batch. `rng`:
    dropout's, or None.
    """
    microbatches = config.optim.microbatches
    constrain = lambda tree: jax.lax.with_sharding_constraint(tree, shardings.grads)
    objective_fn = objective_loss(config, model)

    def loss(p, micro_batch, micro_rng):
        return objective_fn(p, frozen, micro_batch, micro_rng)

    if microbatches == 1:
        (loss_value, aux), grads = jax.value_and_grad(loss, has_aux=True)(params, batch, rng)
        return loss_value, aux, constrain(grads)

    def token_sum_loss(p, micro_batch, micro_rng):
        loss_value, aux = loss(p, micro_batch, micro_rng)
        return loss_value * aux["weight_sum"], aux

    def accumulate(carry, micro):
        micro_batch, index = micro
        grads_acc, loss_acc, aux_acc = carry
        micro_rng = None if rng is None else jax.random.fold_in(rng, index)
        (loss_sum, aux), grads = jax.value_and_grad(token_sum_loss, has_aux=True)(params, micro_batch, micro_rng)
        grads_acc = constrain(jax.tree.map(lambda acc, g: acc + g.astype(jnp.float32), grads_acc, grads))
        # Means become token-weighted sums; the weight sum itself is summed.
        aux_acc = {k: aux_acc[k] + (v if k == "weight_sum" else v * aux["weight_sum"]) for k, v in aux.items()}
        return (grads_acc, loss_acc + loss_sum, aux_acc), None

    micro = _split_microbatches(batch, microbatches, shardings.batch,
                                group=2 if config.data.format == "preference" else 1)
    aux_shapes = jax.eval_shape(lambda: loss(params, jax.tree.map(lambda x: x[0], micro), None)[1])
    init = (constrain(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)),
            jnp.zeros((), jnp.float32),
            jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shapes))
    (grads, loss_sum, aux_sums), _ = jax.lax.scan(accumulate, init, (micro, jnp.arange(microbatches)))
    weight_sum = aux_sums["weight_sum"]
    denominator = jnp.where(weight_sum > 0, weight_sum, 1.0)  # All tokens ignored: loss and gradients are 0.
    aux = {k: v if k == "weight_sum" else v / denominator for k, v in aux_sums.items()}
    grads = constrain(jax.tree.map(lambda g, p: (g / denominator).astype(p.dtype), grads, params))
    return loss_sum / denominator, aux, grads


def _balance_router_biases(params, load_le: jax.Array, config: ml_collections.ConfigDict):
    """`params` with every MoE layer's router bias moved against its experts' load (DeepSeek-V3's auxiliary-loss-free
    balancing, `lm.moe.updated_router_bias`); `load_le` `[moe layers, experts]` in the order `lm.model` sows them
    (scanned: the `layers` stack; unscanned: `layers_{i}` from the first MoE layer on). The biases get no gradient,
    so the optimizer leaves them alone (and `lm.optim` never decays a leaf named `bias`)."""
    rate = config.model.moe.bias_update_rate
    update = lambda bias_e, load_e: moe_lib.updated_router_bias(bias_e, load_e, rate)
    params = dict(params)
    if config.model.scan_layers:
        layers = params["layers"]
        params["layers"] = {**layers, "mlp": {**layers["mlp"], "router": {
            **layers["mlp"]["router"], "bias": update(layers["mlp"]["router"]["bias"], load_le)}}}
        return params
    first_moe_layer = model_lib.layer_stacks(config.model)[-1][1]
    for i in range(load_le.shape[0]):
        name = f"layers_{first_moe_layer + i}"
        router = params[name]["mlp"]["router"]
        params[name] = {**params[name], "mlp": {**params[name]["mlp"], "router": {
            **router, "bias": update(router["bias"], load_le[i])}}}
    return params


def make_train_step(
    config: ml_collections.ConfigDict,
    model: model_lib.Transformer,
    optimizer: optax.GradientTransformation,
    shardings: sharding_lib.Shardings,
) -> Callable[[TrainState, dict[str, jax.Array], Any], tuple[TrainState, dict[str, jax.Array]]]:
    """The jitted `step(state, batch, frozen) -> (state, metrics)`; `state` is donated, `frozen` (the base of a
    PEFT run, `{}` otherwise) is read only.

    Metrics (fp32 scalars): `loss` (the training objective, z-loss included), the objective's own (`nll`, `z_loss`,
    `accuracy` and `tokens`, the weight sum; DPO: `lm.dpo`'s `rewards/*` and `logps/*`, and `pairs`; a reward model:
    `lm.reward`'s `accuracy`, `margin`, `mean_reward` and `pairs`), `grad_norm`
    (before clipping), `learning_rate` (of this step), and the non-finite guard's `skipped` (1 when a gradient was
    not finite and the update was dropped: parameters and optimizer state unchanged), `consecutive_skips` and
    `skipped_total` (`lm.optim.skip_counts`).
    """
    schedule = optim.learning_rate_schedule(config)
    uses_dropout = config.finetune.method == "lora" and config.finetune.lora.dropout > 0

    def step(state: TrainState, batch, frozen):
        rng = jax.random.fold_in(jax.random.key(config.seed), state.step) if uses_dropout else None
        with shardings.activation_rules():
            loss, aux, grads = _loss_and_grads(state.params, frozen, batch, model, config, shardings, rng)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        load_le = aux.pop("moe/load_le", None)
        if load_le is not None and config.model.moe.bias_update_rate > 0 and config.finetune.method == "full":
            params = _balance_router_biases(params, load_le, config)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
        counted = "pairs" if config.data.format == "preference" else "tokens"
        metrics = {
            "loss": loss,
            **{name: value for name, value in aux.items() if name != "weight_sum"},
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": schedule(state.step),
            counted: aux["weight_sum"],
            **optim.skip_counts(opt_state),
        }
        return new_state, metrics

    state_sharding = state_shardings(shardings)
    return jax.jit(
        step,
        in_shardings=(state_sharding, shardings.batch, shardings.frozen),
        out_shardings=(state_sharding, shardings.replicated),
        donate_argnums=0,
    )
