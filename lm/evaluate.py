"""Evaluation: token-weighted loss, perplexity, bits per byte and accuracy of parameters on a split.

    python -m lm.evaluate --workdir=DIR [--step=N | --all_steps] [--config.data.eval_split=...] [--config.eval_steps=N]

The config is the run's own (`DIR/config.json`); `--config.a.b=value` overrides it (another split, source or number
of batches; the model fields must still fit the checkpoint). The tokenizer is the run's own (`DIR/tokenizer.model`).
By default the program evaluates the whole split exactly once (`eval_steps=-1`). It prints the metrics and writes
`DIR/eval_<step>.json`.

In Python, `Evaluator(config, shardings, tokenizer)` is built once and called with parameters as often as needed
(the trainer's periodic evaluation is one, so both report the same numbers); `evaluate(config, params, ...)` does
both in one call. An evaluation reads `config.data.eval_split` from the start each time, in the `windows` layout
(`lm.data.packing`: every target token exactly once, its loss independent of how rows and processes are cut):
- `config.eval_steps = -1`: the whole split, once. Processes whose shard ends first feed all-padding batches until
  every process is done, so the sums are the same on any number of devices and processes.
- `config.eval_steps = N`: the first N batches; if the split ends sooner, it is evaluated once and a warning says so.
Padding has weight 0 and is not counted.

Bits per byte divides the summed loss (in bits) by the UTF-8 bytes of the evaluated target tokens' text
(`Tokenizer.token_bytes`; BOS/EOS/padding have none; a document's first token, the target after BOS, less the space
a SentencePiece-style tokenizer puts in front of every text, `Tokenizer.prefix_bytes`), so it compares models with
different tokenizers. The unigram entropy of the evaluated targets is the loss of the best model that ignores
context: the bar to clear.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator

from absl import flags, logging
import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from ml_collections import config_flags

from lm import attention
from lm import checkpoint
from lm import config as lm_config
from lm import dpo
from lm import init_from as init_from_lib
from lm import model as model_lib
from lm import objective
from lm import peft
from lm import paths
from lm import reward
from lm import sharding as sharding_lib
from lm.data import pipeline, sources
from lm.data import tokenizer as tokenizer_lib
from lm.errors import ArgumentError, ConfigError


def make_preference_eval_step(config: ml_collections.ConfigDict, model: model_lib.Transformer,
                              shardings: sharding_lib.Shardings):
    """The jitted `eval_step(params, reference, batch) -> sums` of a run on preference pairs, a DPO run (`lm.dpo`)
    or a reward model (`lm.reward`, whose `reference` is `{}`): its loss and metrics times the batch's pairs, and the
    pairs, to be added over batches (padding pairs count 0)."""
    if config.finetune.objective == "dpo":
        reference_model = model_lib.build(peft.base_config(config))
        loss_fn = lambda params, reference, batch: dpo.dpo_loss(params, reference, batch, model, reference_model,
                                                                config)
        reference_shardings = shardings.frozen
    else:
        loss_fn = lambda params, reference, batch: reward.reward_loss(params, {}, batch, model, config)
        reference_shardings = {}

    def step(params, reference, batch):
        with shardings.activation_rules():
            loss, aux = loss_fn(params, reference, batch)
        pairs = aux.pop("weight_sum")
        return {"loss": loss * pairs, **{name: value * pairs for name, value in aux.items()}, "pairs": pairs}

    return jax.jit(step, in_shardings=(shardings.params, reference_shardings, shardings.batch),
                   out_shardings=shardings.replicated)


def make_eval_step(config: ml_collections.ConfigDict, model: model_lib.Transformer, shardings: sharding_lib.Shardings):
    """The jitted `eval_step(params, batch) -> sums`: token-weighted sums of the negative log-likelihood (no z-loss,
    no smoothing), correct predictions and weights, to be added over batches (padding has weight 0)."""

    def step(params, batch):
        with shardings.activation_rules():
            _, aux = objective.lm_loss(params, batch, model, config)
        return {"nll_sum": aux["nll"] * aux["weight_sum"], "correct_sum": aux["accuracy"] * aux["weight_sum"],
                "weight_sum": aux["weight_sum"]}

    return jax.jit(step, in_shardings=(shardings.params, shardings.batch), out_shardings=shardings.replicated)


class Evaluator:
    """Evaluates parameters placed by `shardings` on `config.data.eval_split` (module docstring).

    Built once: the split is resolved (a missing split fails here, not at the first evaluation), the eval step
    compiled on first use, the bytes table made; each call reads the split again from its start.
    """

    def __init__(self, config: ml_collections.ConfigDict, shardings: sharding_lib.Shardings,
                 tokenizer: tokenizer_lib.Tokenizer | None, *, model: model_lib.Transformer | None = None):
        self.config = config
        self.shardings = shardings
        self.tokenizer = tokenizer
        if config.data.source == "synthetic":
            if config.eval_steps == -1:
                raise ConfigError("config.eval_steps=-1 evaluates the whole split, but config.data.source="
                                  "'synthetic' is endless; set config.eval_steps to a number of batches")
            self.split = None
        else:
            self.split = sources.resolve(config, config.data.eval_split)
        model = model_lib.build(config) if model is None else model
        self._preference = config.data.format == "preference"
        self._eval_step = (make_preference_eval_step if self._preference else make_eval_step)(config, model, shardings)
        self._bytes_per_id = None if tokenizer is None else tokenizer.token_bytes(config.model.vocab_size)
        # Without BOS a document's first token is never a target, so its prefix is never counted.
        self._prefix_bytes = 0 if tokenizer is None or tokenizer.bos_id is None else tokenizer.prefix_bytes()

    def __call__(self, params, reference=None) -> dict[str, float]:
        """`loss` (mean nats per token), `perplexity`, `accuracy`, `tokens`, `batches`, and with a tokenizer
        `bytes`, `bits_per_byte` and `unigram_entropy` (nats). A DPO run (`lm.dpo`): `loss` (the DPO loss), its
        metrics, `pairs` and `batches`, against `reference` (placed by `shardings.frozen`; default: the base of a
        PEFT run's `params`). A reward model (`lm.reward`): `loss` (Bradley-Terry), `accuracy` (pairwise),
        `margin`, `mean_reward`, `pairs` and `batches`."""
        if self._preference:
            if self.config.finetune.objective != "dpo":
                reference = {}
            elif reference is None:  # A PEFT run's base; nothing when the batches carry the reference's numbers.
                runs_reference = peft.is_peft(self.config) or peft.runs_reference_model(self.config)
                reference = peft.split(params)[0] if runs_reference else {}
            return self._preference_metrics(params, reference)
        config = self.config
        iterator = pipeline.make_eval_iterator(config, tokenizer=self.tokenizer, split=self.split)
        totals, batches = None, 0
        # Evaluated targets per id and those that follow BOS (a document's first token), counted exactly.
        target_counts_v = np.zeros(config.model.vocab_size, np.int64)
        document_starts = 0
        with contextlib.closing(iterator):
            for batch in _batches_on_every_process(iterator, config.eval_steps):
                attention.check_segment_runs(batch["segment_ids"], config.model.attention_max_segments)
                sums = self._eval_step(params, pipeline.to_global_arrays(batch, self.shardings.batch))
                totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
                evaluated = batch["weights"] > 0
                target_counts_v += np.bincount(batch["targets"][evaluated], minlength=config.model.vocab_size)
                if self._prefix_bytes:  # (An empty document's EOS after BOS has no prefix.)
                    starts = (batch["inputs"] == self.tokenizer.bos_id) & (self._bytes_per_id[batch["targets"]] > 0)
                    document_starts += int(np.sum(starts & evaluated))
                batches += 1
        if config.eval_steps != -1 and batches < config.eval_steps:
            logging.warning("config.eval_steps=%d, but split %r ends after %d batches: evaluated the whole split once",
                            config.eval_steps, config.data.eval_split, batches)
        totals = jax.device_get(totals)
        tokens = float(totals["weight_sum"])
        loss = float(totals["nll_sum"]) / max(tokens, 1.0)
        results = {"loss": loss, "perplexity": math.exp(min(loss, 80.0)),
                   "accuracy": float(totals["correct_sum"]) / max(tokens, 1.0), "tokens": tokens, "batches": batches}
        if self._bytes_per_id is not None:
            # Each process counted its own rows; the loss sums are already global, the host-side counts are not.
            summed = _sum_over_processes(np.append(target_counts_v, document_starts))
            target_counts_v, document_starts = summed[:-1], summed[-1]
            text_bytes = float(self._bytes_per_id @ target_counts_v - self._prefix_bytes * document_starts)
            probs = target_counts_v[target_counts_v > 0] / target_counts_v.sum()
            results.update(bytes=text_bytes, bits_per_byte=float(totals["nll_sum"]) / math.log(2) / max(text_bytes, 1.0),
                           unigram_entropy=float(-(probs * np.log(probs)).sum()))
        return results


    def _preference_metrics(self, params, reference) -> dict[str, float]:
        iterator = pipeline.make_eval_iterator(self.config, tokenizer=self.tokenizer, split=self.split)
        totals, batches = None, 0
        with contextlib.closing(iterator):
            for batch in _batches_on_every_process(iterator, self.config.eval_steps):
                sums = self._eval_step(params, reference, pipeline.to_global_arrays(batch, self.shardings.batch))
                totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
                batches += 1
        totals = {name: float(value) for name, value in jax.device_get(totals).items()}
        pairs = totals.pop("pairs")
        return {**{name: value / max(pairs, 1.0) for name, value in totals.items()}, "pairs": pairs,
                "batches": batches}


def _batches_on_every_process(iterator: pipeline.BatchIterator, limit: int) -> Iterator[dict[str, np.ndarray]]:
    """This process's batches, up to `limit` (-1: all), until every process's stream has ended. Every process runs
    the same number of (collective) eval steps: one whose shard ended first feeds all-padding batches."""
    count = 0
    while limit == -1 or count < limit:
        batch = next(iterator, None)
        if jax.process_count() > 1:
            any_left = bool(multihost_utils.process_allgather(np.int32(batch is not None)).any())
        else:
            any_left = batch is not None
        if not any_left:
            return
        yield iterator.padding_batch() if batch is None else batch
        count += 1


def _sum_over_processes(counts: np.ndarray) -> np.ndarray:
    """int64 counts summed over processes exactly. The gather goes through JAX, whose integers are 32-bit unless x64
    is on (and whose floats would be fp32: counts above 2^24 would round), so each process's counts must be below
    2^31."""
    if jax.process_count() == 1:
        return counts
    return np.sum(multihost_utils.process_allgather(counts.astype(np.int32)), axis=0, dtype=np.int64)


def evaluate(config: ml_collections.ConfigDict, params, *, tokenizer: tokenizer_lib.Tokenizer | None = None,
             workdir: str | None = None, shardings: sharding_lib.Shardings | None = None,
             reference=None) -> dict[str, float]:
    """`Evaluator(config, shardings, tokenizer)(params, reference)` in one call (what `Evaluator.__call__`
    returns; `reference`: a DPO run's, see there).

    Args:
      config: the run config (model, data, eval_steps).
      params: parameters, e.g. `lm.checkpoint.restore(...).params`.
      tokenizer: the run's tokenizer; default the one in `workdir` (none is needed for synthetic data).
      workdir: the run's directory, where its tokenizer is.
      shardings: the `Shardings` `params` are placed by (default: built from the mesh `params` live on).
    """
    if tokenizer is None and config.data.source != "synthetic":
        if workdir is None:
            raise ArgumentError("evaluate() needs the run's tokenizer: pass tokenizer= or workdir=")
        tokenizer = tokenizer_lib.from_workdir(workdir)
    if shardings is None:
        shardings = sharding_lib.model_shardings(config, sharding_lib.mesh_of(params, config))
    return Evaluator(config, shardings, tokenizer)(params, reference)


def token_losses(config: ml_collections.ConfigDict, params, token_ids) -> np.ndarray:
    """Per-token negative log-likelihood (nats) of one sequence: entry i is the loss of predicting token i + 1 from
    tokens 0..i, fp32 `[len(token_ids) - 1]` (blockwise, `lm.loss.token_log_probs`: no `[tokens, vocab]` logits)."""
    model = model_lib.build(config)
    tokens_1t = np.asarray(token_ids, np.int32)[None]

    @jax.jit
    def losses(params, tokens_1t):
        log_probs_1t, _ = objective.target_log_probs(params, tokens_1t[:, :-1], tokens_1t[:, 1:], model, config)
        return -log_probs_1t[0]

    return np.asarray(losses(nn.unbox(params), tokens_1t))


def evaluate_checkpoints(workdir: str, steps: list[int | None], config: ml_collections.ConfigDict
                         ) -> Iterator[tuple[int, dict[str, float]]]:
    """Restores each checkpoint of `steps` (None: the latest) of `workdir` in turn, evaluates it with `config` and
    the run's tokenizer, writes `workdir/eval_<step>.json` and yields `(step, results)`."""
    tokenizer = None if config.data.source == "synthetic" else tokenizer_lib.from_workdir(workdir)
    mesh = sharding_lib.default_mesh(config)
    evaluator = Evaluator(config, sharding_lib.model_shardings(config, mesh), tokenizer)
    shardings = evaluator.shardings
    reference = None  # A DPO run's: a PEFT run's base (in its params), or the copy config.init_from names.
    if config.finetune.objective == "dpo" and peft.runs_reference_model(config) and not peft.is_peft(config):
        reference = init_from_lib.initial_params(config, shardings)
    for step in steps:
        restored = checkpoint.restore(workdir, step, mesh, config=config)
        results = evaluator(restored.params, reference)
        if jax.process_index() == 0:
            paths.write_atomic(paths.resolve(workdir, f"eval_{restored.step}.json"), json.dumps(
                {"step": restored.step, "split": config.data.eval_split, "eval_steps": config.eval_steps, **results},
                indent=2))
        yield restored.step, results


def format_results(step: int, results: dict[str, float]) -> str:
    if "pairs" in results and "margin" in results:
        return (f"step {step}: reward model loss {results['loss']:.4f}, pairwise accuracy {results['accuracy']:.4f}, "
                f"margin {results['margin']:.4f}, pairs {results['pairs']:,.0f}")
    if "pairs" in results:
        return (f"step {step}: DPO loss {results['loss']:.4f}, reward accuracy {results['rewards/accuracies']:.4f}, "
                f"reward margin {results['rewards/margins']:.4f}, pairs {results['pairs']:,.0f}")
    line = (f"step {step}: loss {results['loss']:.4f}, perplexity {results['perplexity']:.3f}, "
            f"accuracy {results['accuracy']:.4f}, tokens {results['tokens']:,.0f}")
    if "bits_per_byte" in results:
        line += f", bits per byte {results['bits_per_byte']:.4f} ({results['bytes']:,.0f} bytes)"
    return line


def run_config(workdir: str, override_values: dict) -> ml_collections.ConfigDict:
    """The run's saved config with the command line's `--config.a.b=value` overrides applied, validated; unless
    overridden, `eval_steps` is -1 (the whole split)."""
    config = lm_config.read_config(workdir)
    config.eval_steps = -1
    config.update_from_flattened_dict(override_values)
    return lm_config.validate(config)


def define_flags() -> None:
    """The CLI's flags; defined only when run as a program, so importing this module defines none."""
    flags.DEFINE_string("workdir", None, "Run directory holding config.json and checkpoints/.", required=True)
    flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
    flags.DEFINE_bool("all_steps", False, "Evaluate every kept checkpoint, oldest first.")
    config_flags.DEFINE_config_dict(
        "config", lm_config.base_config(), "Overrides of the run's config, e.g. --config.data.eval_split=train.")


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    if FLAGS.all_steps and FLAGS.step is not None:
        raise ArgumentError("--step and --all_steps exclude each other")
    config = run_config(FLAGS.workdir, config_flags.get_override_values(FLAGS["config"]))
    steps = checkpoint.kept_steps(FLAGS.workdir) if FLAGS.all_steps else [FLAGS.step]
    for step, results in evaluate_checkpoints(FLAGS.workdir, steps, config):
        if jax.process_index() == 0:
            print(format_results(step, results), flush=True)


if __name__ == "__main__":
    from lm import cli

    define_flags()
    cli.run(main)
