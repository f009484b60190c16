"""Evaluation: token-weighted loss, perplexity, bits per byte and accuracy of parameters on a split.

    python -m lm.evaluate --workdir=DIR [--step=N | --all_steps] [--config.data.eval_split=...] [--config.eval_steps=N]

The config is the run's own (`DIR/config.json`); `--config.a.b=value` overrides it (another split, source or number
of batches; the model fields must still fit the checkpoint). Prints the metrics and writes `DIR/eval_<step>.json`.

`evaluate(config, params)` is the same in Python (the trainer calls it for its periodic evaluation, so both report
the same numbers): `config.eval_steps` batches of `config.data.eval_split`, from a fresh iterator each time so every
call sees the same tokens. Padding has weight 0 and is not counted.

Bits per byte divides the summed loss (in bits) by the UTF-8 bytes of the evaluated target tokens' text: the
tokenizer is lossless (no normalization, whitespace kept), so the bytes of each piece are exactly the bytes of the
raw text it encodes; BOS/EOS/padding pieces have none. It compares models with different tokenizers.
"""

from __future__ import annotations

import json
import math
import os

from absl import app, flags, logging
import flax.linen as nn
import jax
import ml_collections
import numpy as np
from ml_collections import config_flags

from lm import checkpoint
from lm import distributed
from lm import config as lm_config
from lm import model as model_lib
from lm import paths
from lm import sharding as sharding_lib
from lm import train_step as train_step_lib
from lm.data import pipeline, sources

def piece_bytes(tokenizer, vocab_size: int) -> np.ndarray:
    """int64 `[vocab_size]`: UTF-8 bytes of the text each token id stands for (0 for control and padded ids)."""
    table = np.zeros(vocab_size, np.int64)
    for i in range(tokenizer.get_piece_size()):
        if tokenizer.is_control(i) or tokenizer.is_unknown(i):
            continue
        # Byte-fallback pieces (<0x0A>) are one byte; others are text with "▁" standing for a space.
        table[i] = 1 if tokenizer.is_byte(i) else len(tokenizer.id_to_piece(i).replace("▁", " ").encode("utf-8"))
    return table


def evaluate(config: ml_collections.ConfigDict, params, *, workdir: str | None = None,
             shardings: sharding_lib.Shardings | None = None, eval_step=None) -> dict[str, float]:
    """Evaluates `params` on `config.eval_steps` batches of `config.data.eval_split`.

    Args:
      config: the run config (model, data, eval_steps).
      params: parameters, e.g. `lm.checkpoint.restore(...).params` or the trainer's `state.params`.
      workdir: where the run's tokenizer is cached (as the trainer was given it).
      shardings: the `Shardings` `params` are placed by (default: built from the mesh `params` live on).
      eval_step: a jitted `lm.train_step.make_eval_step` to reuse (the trainer's); built from `shardings` if None.

    Returns:
      `loss` (mean nats per token), `perplexity`, `accuracy`, `tokens`, and when the data has a tokenizer `bytes`
      and `bits_per_byte`.
    """
    if shardings is None:
        shardings = train_step_lib.model_shardings(config, checkpoint.mesh_of(params, config))
    if eval_step is None:
        eval_step = train_step_lib.make_eval_step(config, model_lib.build(config), shardings)
    iterator = pipeline.make_eval_iterator(config, workdir=workdir)
    bytes_per_id = None if iterator.tokenizer is None else piece_bytes(iterator.tokenizer, config.model.vocab_size)
    totals, text_bytes = None, 0.0
    for _ in range(config.eval_steps):
        batch = next(iterator)
        sums = eval_step(params, pipeline.to_global_arrays(batch, shardings.batch))
        totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
        if bytes_per_id is not None:
            text_bytes += float((bytes_per_id[batch["targets"]] * batch["weights"]).sum())
    iterator.close()
    totals = jax.device_get(totals)
    tokens = float(totals["weight_sum"])
    loss = float(totals["nll_sum"]) / max(tokens, 1.0)
    results = {"loss": loss, "perplexity": math.exp(min(loss, 80.0)),
               "accuracy": float(totals["correct_sum"]) / max(tokens, 1.0), "tokens": tokens}
    if bytes_per_id is not None:
        text_bytes = _sum_over_processes(text_bytes)
        results.update(bytes=text_bytes, bits_per_byte=float(totals["nll_sum"]) / math.log(2) / max(text_bytes, 1.0))
    return results


def _sum_over_processes(value: float) -> float:
    """Each process counted the bytes of its own rows; the loss sums are global, so the byte count must be too."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils
    return float(np.sum(multihost_utils.process_allgather(np.asarray(value, np.float64))))


def token_losses(config: ml_collections.ConfigDict, params, token_ids) -> np.ndarray:
    """Per-token negative log-likelihood (nats) of one sequence: entry i is the loss of predicting token i + 1 from
    tokens 0..i. Full logits for one short sequence (a notebook's sentence), fp32: `[len(token_ids) - 1]`."""
    model = model_lib.build(config)
    tokens_1t = np.asarray(token_ids, np.int32)[None]

    @jax.jit
    def losses(params, tokens_1t):
        hidden_1td = model.apply({"params": params}, tokens_1t)
        logits_1tv = model.apply({"params": params}, hidden_1td, method=model.logits)
        log_probs_1tv = jax.nn.log_softmax(logits_1tv[:, :-1])
        return -jax.numpy.take_along_axis(log_probs_1tv, tokens_1t[:, 1:, None], axis=-1)[0, :, 0]

    return np.asarray(losses(nn.unbox(params), tokens_1t))


def evaluate_checkpoint(workdir: str, step: int | None = None, config: ml_collections.ConfigDict | None = None
                        ) -> tuple[int, dict[str, float]]:
    """Restores checkpoint `step` (default latest) of `workdir`, evaluates it and writes `workdir/eval_<step>.json`."""
    restored = checkpoint.restore(workdir, step, config=config)
    results = evaluate(restored.config, restored.params, workdir=workdir, shardings=restored.shardings)
    if jax.process_index() == 0:
        paths.write_atomic(paths.resolve(workdir, f"eval_{restored.step}.json"), json.dumps(
            {"step": restored.step, "split": restored.config.data.eval_split,
             "eval_steps": restored.config.eval_steps, **results}, indent=2))
    return restored.step, results


def format_results(step: int, results: dict[str, float]) -> str:
    line = (f"step {step}: loss {results['loss']:.4f}, perplexity {results['perplexity']:.3f}, "
            f"accuracy {results['accuracy']:.4f}, tokens {results['tokens']:,.0f}")
    if "bits_per_byte" in results:
        line += f", bits per byte {results['bits_per_byte']:.4f} ({results['bytes']:,.0f} bytes)"
    return line


def run_config(workdir: str, override_values: dict) -> ml_collections.ConfigDict:
    """The run's saved config with the command line's `--config.a.b=value` overrides applied, validated."""
    config = checkpoint.read_config(workdir)
    config.update_from_flattened_dict(override_values)
    lm_config.validate(config)
    return config


def define_flags() -> None:
    """The CLI's flags; defined only when run as a program, so importing this module defines none."""
    flags.DEFINE_string("workdir", None, "Run directory holding config.json and checkpoints/.")
    flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
    flags.DEFINE_bool("all_steps", False, "Evaluate every kept checkpoint, oldest first.")
    config_flags.DEFINE_config_dict(
        "config", lm_config.base_config(), "Overrides of the run's config, e.g. --config.data.eval_split=train.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    FLAGS = flags.FLAGS
    if FLAGS.workdir is None:
        raise app.UsageError("--workdir=DIR is required")
    if FLAGS.all_steps and FLAGS.step is not None:
        raise app.UsageError("--step and --all_steps exclude each other")
    workdir = FLAGS.workdir
    try:
        distributed.initialize()
        config = run_config(workdir, config_flags.get_override_values(FLAGS["config"]))
        steps = checkpoint.kept_steps(workdir) if FLAGS.all_steps else [FLAGS.step]
        for step in steps:
            step, results = evaluate_checkpoint(workdir, step, config)
            if jax.process_index() == 0:
                print(format_results(step, results), flush=True)
    except (lm_config.ConfigError, checkpoint.CheckpointError, sources.DataError,
            distributed.DistributedError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    define_flags()
    app.run(main)
