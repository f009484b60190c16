"""PPO on lm's models: `python -m lm.rl --config=... --workdir=...` with `config.finetune.objective = "ppo"`.

Each step is one rollout batch, then several epochs of clipped-surrogate updates on it (`lm.ppo` has the math):

    config.data.batch_size prompts (`config.rl.prompts`, drawn by step) ─▶ lm.generate's KV-cache sampler
      ─▶ rows [prompt, response, padding] ─▶ score_b: `config.rl.reward_fn(prompts, completions)` or the reward
         model `config.rl.reward_model` (`lm.reward.sequence_scores`)
      ─▶ one forward of the policy (log-probs, values) and of the reference (log-probs), jitted together
      ─▶ per-token KL, rewards, GAE, whitened advantages
      ─▶ `config.rl.epochs` × `config.rl.minibatches` train steps (`lm.train_step`, objective `lm.ppo.ppo_loss`)
      ─▶ the adaptive KL coefficient (`config.rl.kl_target` > 0), metrics, checkpoint

The policy is the starting model (`config.init_from`) with a value head (`lm.model`'s scalar head, starting at 0),
all of it trained (`finetune.method = full`) or LoRA / prefix / LoReFT adapters and the head over the frozen base.
The reference is the starting model: a PEFT run's base (adapters off, no second copy), or a frozen copy.

Everything a step draws is a function of `(config.seed, step)`: the prompts, the sampling key, the minibatch
order. A checkpoint (the trainable parameters, optimizer state and KL coefficient; no data iterator) therefore
resumes bitwise equal to a run that was never interrupted. Checkpoints read like any run's: `lm.generate` and
`lm.evaluate` restore the policy (its value head is ignored).

Metrics per step (`metrics.jsonl`, TensorBoard): `reward` (the mean score), `kl` (mean over responses of the summed
per-token KL to the reference, TRL's `objective/kl`), `kl_coef`, `non_score_reward` (mean summed `-kl_coef * kl`),
`entropy` (mean per-token entropy of the rollout policy), `response_length`, and the updates' means: `loss`,
`policy_loss`, `value_loss`, `policy/clipfrac`, `policy/approxkl`, `val/ratio`, `val/clipfrac`, `grad_norm`,
`learning_rate`, `skipped_updates` (non-finite ones, dropped: `lm.optim`); `rollout_time` and `update_time` in seconds,
and `tokens_per_sec` (the rollouts' prompt and response tokens over the whole step's time). Updates with a non-finite
gradient are skipped; `config.max_consecutive_skips` of them in a row stop the run before anything is saved.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import time

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_flags

from lm import checkpoint
from lm import config as lm_config
from lm import generate as generate_lib
from lm import init_from as init_from_lib
from lm import metrics as metrics_lib
from lm import model as model_lib
from lm import objective
from lm import peft
from lm import ppo
from lm import reward
from lm import sharding as sharding_lib
from lm import train as train_lib
from lm import train_step as train_step_lib
from lm import workdir as workdir_lib
from lm.data import chat, sft, tokenizer_training
from lm.data import tokenizer as tokenizer_lib
from lm.data.pipeline import pad_id_of
from lm.errors import ConfigError, RecordError


@flax.struct.dataclass
class RlState:
    """What a PPO checkpoint holds: the train state's fields (so `lm.checkpoint.restore` reads its `params` like
    any run's) and the KL coefficient, which the adaptive controller changes."""

    step: jax.Array  # int32: optimizer updates taken.
    params: object
    opt_state: object
    kl_coef: jax.Array  # fp32 scalar.

    def train_state(self) -> train_step_lib.TrainState:
        return train_step_lib.TrainState(step=self.step, params=self.params, opt_state=self.opt_state)


def read_prompts(config: ml_collections.ConfigDict, tokenizer) -> tuple[list[str], list[list[int]]]:
    """`(texts, ids)` of the prompts in `config.rl.prompts`: a string is `[BOS] prompt` as SFT records start; chat
    messages are rendered by the chat template up to the assistant's turn. A bad record, or a prompt longer than
    `config.data.seq_len - config.rl.max_new_tokens` tokens (a row holds the prompt, the response and, after a
    response cut short, the EOS a reward model reads), is one line naming FILE:LINE."""
    template, add_bos = sft.chat_template(config, tokenizer)
    limit = config.data.seq_len - config.rl.max_new_tokens
    texts, ids = [], []
    try:
        with open(config.rl.prompts, encoding="utf-8") as f:
            lines = list(f)  # Split as lm.data.sft numbers records' lines: on newlines only.
    except OSError as error:
        raise ConfigError(f"config.rl.prompts={config.rl.prompts!r} cannot be read ({error.strerror})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{config.rl.prompts}:{number}"
        try:
            prompt = json.loads(line).get("prompt")
        except (json.JSONDecodeError, AttributeError):
            raise RecordError(f"{where}: a prompt record must be a JSON object {{\"prompt\": ...}}") from None
        if isinstance(prompt, list):
            sft.check_messages(prompt, "'prompt'", f"{where}: a prompt record", ends_with_assistant=False)
            prompt = chat.render(template, prompt, tokenizer.special_tokens(), add_generation_prompt=True)
        elif not isinstance(prompt, str) or not prompt:
            raise RecordError(f"{where}: a prompt record needs 'prompt', a non-empty string or chat messages")
        tokens = ([tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []) + tokenizer.encode(prompt)
        if len(tokens) > limit:
            raise RecordError(f"{where}: the prompt has {len(tokens)} tokens; with config.rl.max_new_tokens="
                              f"{config.rl.max_new_tokens} rows hold at most {limit} (config.data.seq_len - "
                              f"max_new_tokens)")
        texts.append(prompt)
        ids.append(tokens)
    if not ids:
        raise RecordError(f"config.rl.prompts={config.rl.prompts!r} holds no prompt")
    return texts, ids


def rollout_rows(prompts: list[list[int]], responses: list[list[int]], seq_len: int, pad_id: int
                 ) -> dict[str, np.ndarray]:
    """`inputs`, `targets` (int32) and `weights` (fp32, 1 on the response's targets), `[rows, seq_len]`: each row
    one sequence `prompt + response`, right-padded."""
    rows = len(prompts)
    inputs = np.full((rows, seq_len), pad_id, np.int32)
    targets = np.full((rows, seq_len), pad_id, np.int32)
    weights = np.zeros((rows, seq_len), np.float32)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        sequence = prompt + response
        inputs[i, :len(sequence) - 1] = sequence[:-1]
        targets[i, :len(sequence) - 1] = sequence[1:]
        weights[i, len(prompt) - 1:len(sequence) - 1] = 1.0
    return {"inputs": inputs, "targets": targets, "weights": weights}


def reward_function(spec: str):
    """The Python function `config.rl.reward_fn` names (`module:function`)."""
    module_name, _, name = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"config.rl.reward_fn={spec!r} cannot be imported ({error})") from None
    return function


class _Scorer:
    """Scores a rollout batch: `config.rl.reward_fn` on the texts, or the reward model on the token rows."""

    def __init__(self, config: ml_collections.ConfigDict, shardings: sharding_lib.Shardings, tokenizer):
        self.function = reward_function(config.rl.reward_fn) if config.rl.reward_fn else None
        self.seq_len, self.batch_sharding = config.data.seq_len, shardings.batch
        self.eos_id, self.pad_id = tokenizer.eos_id, pad_id_of(tokenizer)
        if self.function is not None:
            return
        restored = checkpoint.restore(config.rl.reward_model, mesh=shardings.mesh)
        if restored.config.finetune.objective != "reward":
            raise ConfigError(f"config.rl.reward_model={config.rl.reward_model!r} is a run with finetune.objective="
                              f"{restored.config.finetune.objective!r}, not a reward model ('reward')")
        if restored.config.model.vocab_size != config.model.vocab_size:
            raise ConfigError(f"config.rl.reward_model={config.rl.reward_model!r} has vocab_size "
                              f"{restored.config.model.vocab_size}, the policy {config.model.vocab_size}: they must "
                              f"share the tokenizer")
        if restored.config.model.max_seq_len < config.data.seq_len:
            raise ConfigError(f"config.rl.reward_model={config.rl.reward_model!r} has max_seq_len "
                              f"{restored.config.model.max_seq_len}, below config.data.seq_len={config.data.seq_len}")
        self.params = restored.params
        rm_model = model_lib.build(restored.config)
        rm_shardings = restored.shardings

        def score(params, rows):
            with rm_shardings.activation_rules():
                return reward.sequence_scores(params, rows, rm_model)

        self._score = jax.jit(score, in_shardings=(rm_shardings.params, shardings.batch),
                              out_shardings=shardings.replicated)  # Every process reads every score.

    def __call__(self, prompt_texts: list[str], completion_texts: list[str], prompts: list[list[int]],
                 responses: list[list[int]]) -> np.ndarray:
        """fp32 `[rows]` scores of the responses to the prompts (texts for a function, ids for a reward model)."""
        if self.function is None:
            # A reward model scores where it predicts a completion's last token, its EOS (`lm.reward`): a response
            # cut short at max_new_tokens gets one, so that the score has read all of it.
            ended = [r if r and r[-1] == self.eos_id else r + [self.eos_id] for r in responses]
            rows = rollout_rows(prompts, ended, self.seq_len, self.pad_id)
            rows = {name: sharding_lib.from_host(array, self.batch_sharding) for name, array in rows.items()}
            return np.asarray(jax.device_get(self._score(self.params, rows)), np.float32)
        scores = np.asarray(self.function(prompt_texts, completion_texts), np.float64)
        if scores.shape != (len(completion_texts),) or not np.all(np.isfinite(scores)):
            raise ConfigError(f"config.rl.reward_fn must return one finite number per completion: got "
                              f"{scores.shape} values for {len(completion_texts)} completions")
        return scores.astype(np.float32)


def make_prepare(config: ml_collections.ConfigDict, model: model_lib.Transformer,
                 shardings: sharding_lib.Shardings):
    """The jitted `prepare(trainable, frozen, rows, score_b, kl_coef) -> (features, stats)`: the rollout's
    log-probabilities and values under the policy, the reference's log-probabilities, per-token KL and rewards,
    GAE and whitened advantages (`lm.ppo.ROLLOUT_FEATURES`, `[b, t]`), and the rollout's metrics."""
    settings = config.rl
    reference_model = model_lib.build(peft.base_config(config))

    def prepare(trainable, frozen, rows, score_b, kl_coef):
        with shardings.activation_rules():
            log_prob_bt, value_bt, entropy_bt = ppo.policy_log_probs_and_values(
                peft.combine(frozen, trainable), rows, model, config, entropy=True)
            hidden_btd, kernel_dv = objective.batch_hidden_and_head(frozen, rows, reference_model)
            ref_log_prob_bt = ppo.tempered_log_probs(hidden_btd, kernel_dv, rows["targets"], config)
        mask_bt = rows["weights"]
        kl_bt = jnp.where(mask_bt > 0, ppo.kl_per_token(log_prob_bt, ref_log_prob_bt, settings.kl_estimator), 0.0)
        rewards_bt = ppo.token_rewards(score_b, kl_bt, mask_bt, kl_coef)
        advantages_bt, returns_bt = ppo.gae(rewards_bt, value_bt, mask_bt, settings.gamma, settings.lam)
        advantages_bt = jnp.where(mask_bt > 0, ppo.masked_whiten(advantages_bt, mask_bt), 0.0)
        features = dict(zip(ppo.ROLLOUT_FEATURES, (jnp.where(mask_bt > 0, log_prob_bt, 0.0), value_bt,
                                                   advantages_bt, returns_bt)))
        kl_b = jnp.sum(kl_bt, axis=1)
        stats = {"reward": jnp.mean(score_b), "kl": jnp.mean(kl_b), "non_score_reward": -kl_coef * jnp.mean(kl_b),
                 "entropy": ppo.masked_mean(entropy_bt, mask_bt), "response_length": jnp.mean(jnp.sum(mask_bt, 1))}
        return features, stats

    return jax.jit(prepare, in_shardings=(shardings.trainable, shardings.frozen, shardings.batch, _row_sharding(shardings),
                                          shardings.replicated),
                   out_shardings=(shardings.batch, shardings.replicated))


def _row_sharding(shardings: sharding_lib.Shardings) -> NamedSharding:
    """The sharding of a `[rows]` array that splits rows as `shardings.batch` splits `[rows, length]` ones."""
    return NamedSharding(shardings.mesh, P(shardings.batch.spec[0]))


def update_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config of one optimizer update: a minibatch of rows, and the schedule counted in updates
    (`rl.epochs * rl.minibatches` per step)."""
    updates = config.rl.epochs * config.rl.minibatches
    resolved = config.copy_and_resolve_references()
    resolved.data.batch_size = config.data.batch_size // config.rl.minibatches
    resolved.rl.minibatches = 1  # Checked on the rollout batch already; the update config is one minibatch.
    resolved.total_steps = config.total_steps * updates
    resolved.optim.warmup_steps = config.optim.warmup_steps * updates
    return resolved


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Runs PPO with `config` in `workdir` (resuming from its latest checkpoint); returns the last step's metrics."""
    config = init_from_lib.with_source_model(config)
    if config.finetune.objective != "ppo":
        raise ConfigError(f"config.finetune.objective={config.finetune.objective!r}: python -m lm.rl runs 'ppo' "
                          f"(other objectives train with python -m lm.train)")
    training = train_step_lib.build(update_config(config))  # Validates; a minibatch must split over the mesh.
    shardings = training.shardings
    workdir_lib.ensure_directory(workdir)
    if not config.data.tokenizer.path:
        raise ConfigError("config.finetune.objective='ppo' needs the policy's tokenizer: config.init_from's, or "
                          "config.data.tokenizer.path")
    tokenizer = tokenizer_training.get_or_train(config, None)
    prompt_texts, prompt_ids = read_prompts(config, tokenizer)
    scorer = _Scorer(config, shardings, tokenizer)
    settings, rows_per_step = config.rl, config.data.batch_size
    pad_id = pad_id_of(tokenizer)
    with contextlib.ExitStack() as resources:
        resources.enter_context(workdir_lib.WorkdirLock(workdir))
        lm_config.check_same_model(workdir, config)
        if jax.process_index() == 0 and not tokenizer_lib.in_workdir(workdir):
            tokenizer.save(workdir)  # lm.generate, lm.evaluate and lm.hf export read it from the workdir.
        checkpoints = resources.enter_context(contextlib.closing(checkpoint.manager(workdir, config.keep_checkpoints)))
        abstract = training.abstract_state()
        abstract = RlState(step=abstract.step, params=abstract.params, opt_state=abstract.opt_state,
                           kl_coef=jax.ShapeDtypeStruct((), jnp.float32, sharding=shardings.replicated))
        restored = checkpoint.restore_latest_state(checkpoints, abstract, None)
        frozen = init_from_lib.initial_params(config, shardings)  # The reference; a PEFT run's base too.
        if restored is None:
            start = training.init_state() if peft.is_peft(config) else training.state_from(frozen)
            state = RlState(step=start.step, params=start.params, opt_state=start.opt_state,
                            kl_coef=jax.device_put(jnp.float32(settings.kl_coef), shardings.replicated))
            _log(f"PPO from {config.init_from} ({config.finetune.method} parameters and a new value head)")
        else:
            step, state = restored
            _log(f"resumed from step {step}")
        if jax.process_index() == 0:
            lm_config.write_config(workdir, config)
        writer = resources.enter_context(contextlib.closing(metrics_lib.MetricsWriter(
            workdir, int(state.step) // (settings.epochs * settings.minibatches))))
        step_fn = training.train_step()
        prepare = make_prepare(config, training.model, shardings)
        select = jax.jit(lambda batch, rows_m: jax.tree.map(lambda x: x[rows_m], batch),
                         out_shardings=shardings.batch)
        sampling = generate_lib.Sampling(temperature=settings.temperature, top_k=0, top_p=1.0)
        minibatch_rows = rows_per_step // settings.minibatches
        last = {}
        first = int(state.step) // (settings.epochs * settings.minibatches) + 1
        for step in range(first, config.total_steps + 1):
            train_lib._faults.starting(step)
            started = time.perf_counter()
            draw = np.random.default_rng([config.seed, step])
            chosen = draw.choice(len(prompt_ids), size=rows_per_step, replace=len(prompt_ids) < rows_per_step)
            prompts = [prompt_ids[i] for i in chosen]
            policy = peft.combine(frozen, state.params)
            responses = generate_lib.generate(
                config, policy, prompts, max_new_tokens=settings.max_new_tokens, sampling=sampling,
                seed=int(draw.integers(2**31)), eos_id=tokenizer.eos_id, pad_id=pad_id, mesh=shardings.mesh)
            host_rows = rollout_rows(prompts, responses, config.data.seq_len, pad_id)
            rows = {name: sharding_lib.from_host(array, shardings.batch) for name, array in host_rows.items()}
            completions = [tokenizer.decode([t for t in r if t != tokenizer.eos_id]) for r in responses]
            score_b = scorer([prompt_texts[i] for i in chosen], completions, prompts, responses)
            features, stats = prepare(state.params, frozen, rows,
                                      sharding_lib.from_host(score_b, _row_sharding(shardings)), state.kl_coef)
            batch = {**rows, **features}
            rollout_time = time.perf_counter() - started
            train_state, sums = state.train_state(), None
            for epoch in range(settings.epochs):
                order = draw.permutation(rows_per_step)
                for start in range(0, rows_per_step, minibatch_rows):
                    train_state, metrics = step_fn(train_state, select(batch, order[start:start + minibatch_rows]),
                                                   frozen)
                    sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
                    # Waits for this update (PPO's updates are few per step): stop before optax applies a bad one.
                    train_lib.check_finite(step, metrics, config, checkpoints)
            kl_coef = state.kl_coef
            if settings.kl_target > 0:
                kl_coef = ppo.adaptive_kl_coef(kl_coef, stats["kl"], settings.kl_target, settings.kl_horizon,
                                               rows_per_step)
            state = RlState(step=train_state.step, params=train_state.params, opt_state=train_state.opt_state,
                            kl_coef=kl_coef)
            updates = settings.epochs * settings.minibatches
            sums = jax.device_get(sums)
            last = {name: float(value) / updates for name, value in sums.items()
                    if name not in ("tokens", "skipped", "consecutive_skips", "skipped_total")}
            last.update({name: float(value) for name, value in jax.device_get(stats).items()})
            step_time = time.perf_counter() - started
            tokens = sum(len(p) + len(r) for p, r in zip(prompts, responses))
            last.update(kl_coef=float(kl_coef), skipped_updates=float(sums["skipped"]), rollout_time=rollout_time,
                        update_time=step_time - rollout_time, tokens_per_sec=tokens / step_time)
            if step % config.log_every == 0 or step == config.total_steps:
                writer.write(step, last)
                _log(f"step {step}: reward {last['reward']:.4f}, kl {last['kl']:.4f} (coef {last['kl_coef']:.4f}), "
                     f"clipfrac {last['policy/clipfrac']:.3f}, value loss {last['value_loss']:.4f}, "
                     f"entropy {last['entropy']:.3f}")
            if step % config.checkpoint_every == 0 or step == config.total_steps:
                checkpoint.save(checkpoints, step, state, None, config)
        checkpoints.wait_until_finished()
    return last


def define_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py).", lock_config=True)
    flags.mark_flag_as_required("config")
    flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, config.", required=True)


def main(argv):
    del argv
    train(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    from lm import cli

    define_flags()
    cli.run(main)
