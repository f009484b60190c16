"""`HarnessModel`: an lm checkpoint as an lm-evaluation-harness model, registered as `lm`.

    lm_eval.simple_evaluate(model=HarnessModel(workdir), tasks=[...], task_manager=...)   # or model="lm",
                                                                                           # model_args="workdir=W"

The three request types, with the harness's own semantics (those of its `hf` backend, `HFLM`, so the same weights
give the same scores):
- `loglikelihood(context, continuation)`: `TemplateLM` tokenizes the pair (the continuation's tokens are those of
  `context + continuation` past the context's); the last `max_length + 1` tokens are kept; the sum of the
  continuation's log-probabilities and whether each of its tokens is the argmax (`is_greedy`).
- `loglikelihood_rolling(text)`: the text's tokens in the harness's disjoint rolling windows of `max_length`
  (`lm_eval.utils.get_rolling_token_windows`, the prefix token first), each window scored as a loglikelihood
  request, summed per text.
- `generate_until(context, gen_kwargs)`: the context's tokens, left-truncated to `max_length - max_gen_toks`, run
  through lm's KV-cache sampler (`lm.generate.generate`: greedy unless `do_sample`/`temperature`, `top_k`, `top_p`)
  for up to `max_gen_toks` tokens; a row stops early at EOS or at a token whose text holds a stop sequence; the text
  is cut at the first stop sequence (`until`).

Tokenization is `Tokenizer.encode(text, add_special_tokens=True)`: what transformers' `tokenizer.encode` gives for an
imported model's `tokenizer.json`, BOS + text for lm's own SentencePiece runs. An empty context is the prefix token
(BOS, else EOS).

Execution: loglikelihood requests that give the model the same input tokens (all of `context + continuation` but
its last token: the choices of a question with one-token answers) share one row, their last tokens scored together
at its last position, as `hf` shares its logits among them; rows (generation requests: the harness's `Collator`)
are sorted by length, longest first, cut into batches of `batch_size` rows (over the whole mesh; padded to a
multiple of the data shards), and each batch is right-padded to a bucketed length (16, 24, 32, 48, 64, ... up to
`max_length`), so an evaluation compiles a handful of shapes. Rows are placed by the run's sharding rules;
per-token log-probabilities come from the blockwise loss machinery (`lm.objective.target_log_probs`), never
`[tokens, vocab]` logits. Every JAX process runs every request (the harness sees one rank; JAX programs are SPMD),
so results are the same on every process.
"""

from __future__ import annotations

import json
import logging

import jax
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval import utils as harness_utils
from lm_eval.models import utils as harness_model_utils
import numpy as np
from tqdm import tqdm

from lm import checkpoint
from lm import config as lm_config
from lm import generate as generate_lib
from lm import model as model_lib
from lm import objective
from lm import paths
from lm import sharding as sharding_lib
from lm.data import tokenizer as tokenizer_lib
from lm.errors import ArgumentError

log = logging.getLogger(__name__)

SHORTEST_BUCKET = 16


def bucket_length(length: int, longest: int) -> int:
    """The padded length of a batch whose longest row has `length` tokens: the first of 16, 24, 32, 48, 64, 96, ...
    (powers of two and 1.5x them: at most 50% padding, two shapes per doubling) that holds it, at most `longest`."""
    bucket = SHORTEST_BUCKET
    while bucket < length:
        bucket = bucket + bucket // 2 if bucket & (bucket - 1) == 0 else bucket // 3 * 4
    return min(bucket, longest)


@register_model("lm")
class HarnessModel(TemplateLM):
    """A checkpoint of the run in `workdir` as an lm-evaluation-harness model (module docstring).

    Args (the harness's `--model_args`, plus its `--batch_size`):
      workdir: an lm run or an imported model (`python -m lm.hf import`).
      step: which checkpoint (default: the latest).
      batch_size: rows per step over the whole mesh (the harness's `auto` is not supported).
      max_length: the context window in tokens (default and most: `config.model.max_seq_len`).
      max_gen_toks: tokens `generate_until` produces unless a task sets `max_gen_toks`.
      seed: the sampler's seed when a task samples (`do_sample`).
      mesh: where the parameters and batches go (Python only; default: the run's mesh if it fits these devices,
        else every device on `fsdp`, as `lm.checkpoint.restore`).
      device, max_batch_size, trust_remote_code: the harness passes them to every model; lm places arrays on JAX's
        devices (the mesh) and ignores them.
    """

    def __init__(self, workdir: str, step: int | None = None, batch_size: int | str = 16,
                 max_length: int | None = None, max_gen_toks: int = 256, seed: int = 0,
                 mesh: jax.sharding.Mesh | None = None, device: str | None = None, max_batch_size: int | None = None,
                 trust_remote_code: bool | None = None, **unknown):
        super().__init__()
        if unknown:
            raise ArgumentError(f"--model_args: lm takes workdir, step, max_length, max_gen_toks and seed, not "
                                f"{', '.join(sorted(unknown))}")
        del max_batch_size, trust_remote_code
        if device is not None:
            log.info("lm places the model on JAX's devices (the mesh); device=%r is ignored", device)
        # Everything cheap is checked before the weights are read.
        self._batch_size = _positive_int(batch_size, "batch_size")
        self._max_gen_toks = _positive_int(max_gen_toks, "max_gen_toks")
        self.workdir = workdir
        self.config = lm_config.read_config(workdir)
        most = self.config.model.max_seq_len
        self._max_length = most if max_length is None else _positive_int(max_length, "max_length")
        if self._max_length > most:
            raise ArgumentError(f"max_length={self._max_length} exceeds the model's config.model.max_seq_len={most}")
        self.tokenizer = tokenizer_lib.from_workdir(workdir)
        tokenizer_lib.check_vocab_size(self.tokenizer, self.config)
        if self.tokenizer.eos_id is None and self.tokenizer.bos_id is None:
            raise ArgumentError(f"{workdir}: the tokenizer has neither BOS nor EOS, one of which starts an empty "
                                "context")
        restored = checkpoint.restore(workdir, step, mesh, config=self.config)
        self.params, self.step, self.shardings = restored.params, restored.step, restored.shardings
        self._seed = int(seed)
        shards = sharding_lib.row_shards(self.shardings.batch)
        self._rows = -(-self._batch_size // shards) * shards  # Rows of every batch, padding rows included.
        # `[batch]` and `[batch, K]` arrays: rows split as those of `[batch, length]` ones, the rest whole.
        rows = self.shardings.batch.spec[0] if self.shardings.batch.spec else None
        self._rows_sharding = jax.sharding.NamedSharding(self.shardings.batch.mesh, jax.sharding.PartitionSpec(rows))
        self._score = _scorer(self.config, self.shardings, self._rows_sharding)
        self._stop_ids: dict[tuple[str, ...], tuple[int, ...]] = {}

    # The harness's view of the model ---------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return f"lm-{self.tokenizer.fingerprint()}"

    def get_model_info(self) -> dict:
        """Goes into the results' `config`: where the weights came from (what `save_results` reads), their size."""
        return {"workdir": self.workdir, "step": self.step, "model_dtype": self.config.model.dtype,
                "model_num_parameters": sum(x.size for x in jax.tree.leaves(self.params))}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        ids = self.tokenizer.encode(string, add_special_tokens=True if add_special_tokens is None
                                    else add_special_tokens)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    # Log-likelihoods --------------------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """`(sum of the continuation's log-probs, every continuation token the argmax)` per
        `(cache key, context ids, continuation ids)`, in the order given.

        The model reads `(context + continuation)[:-1]`, its last `max_length` tokens. Requests that give it the same
        tokens (the choices of a multiple-choice question with one-token answers, say) share one row: their last
        tokens are scored together at the row's last position, as the harness's `hf` backend shares its logits. A
        row's prompt is its context (what LoReFT runs that edit chosen prompt positions read), so requests share a row
        only when their contexts have the same length too.
        """
        rows: dict[tuple[tuple[int, ...], int], list[int]] = {}
        for index, (_, context, continuation) in enumerate(requests):
            inputs = tuple((context + continuation)[:-1][-self._max_length:])
            if not 0 < len(continuation) <= len(inputs):  # (An empty context would leave nothing to condition on.)
                raise ArgumentError(f"a request needs a context token and a continuation of 1 to "
                                    f"max_length={self._max_length} tokens, got {len(context)} and {len(continuation)}")
            rows.setdefault((inputs, len(inputs) + 1 - len(continuation)), []).append(index)
        ordered = sorted(rows.items(), key=lambda row: (-len(row[0][0]), row[0]))  # Longest first, as the harness.
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), disable=disable_tqdm or jax.process_index() != 0,
                        desc="lm: loglikelihood requests")
        for start in range(0, len(ordered), self._batch_size):
            batch = ordered[start:start + self._batch_size]
            log_prob_bt, argmax_bt, last_log_prob_bk, last_argmax_bk = self._score_rows(
                [row for row, _ in batch], [[requests[i][2][-1] for i in members] for _, members in batch])
            for b, ((inputs, _), members) in enumerate(batch):
                last = len(inputs) - 1  # The position that predicts a continuation's last token.
                for k, index in enumerate(members):
                    key, _, continuation = requests[index]
                    first = last + 1 - len(continuation)
                    answer = (float(np.sum(log_prob_bt[b, first:last]) + last_log_prob_bk[b, k]),
                              bool(np.all(argmax_bt[b, first:last]) and last_argmax_bk[b, k]))
                    if key is not None:
                        self.cache_hook.add_partial("loglikelihood", key, answer)
                    results[index] = answer
                progress.update(len(members))
        progress.close()
        return results

    def _score_rows(self, rows: list[tuple[tuple[int, ...], int]], last_targets: list[list[int]]
                    ) -> tuple[np.ndarray, ...]:
        """Scores each row's inputs (`rows`: `(inputs, prompt length)`) against its next tokens, and at its last
        position each of its `last_targets`: `(log_prob_bt, is_argmax_bt, last_log_prob_bk, last_is_argmax_bk)` on
        the host (one per row)."""
        length = bucket_length(max(len(inputs) for inputs, _ in rows), self._max_length)
        candidates = 1 << (max(map(len, last_targets)) - 1).bit_length()  # A power of two: few compiled shapes.
        inputs_bt = np.zeros((self._rows, length), np.int32)
        targets_bt = np.zeros((self._rows, length), np.int32)
        last_b = np.zeros((self._rows,), np.int32)
        last_targets_bk = np.zeros((self._rows, candidates), np.int32)
        prompt_length_b = np.zeros((self._rows,), np.int32)
        for b, ((tokens, prompt_length), targets) in enumerate(zip(rows, last_targets)):
            inputs_bt[b, :len(tokens)] = tokens
            targets_bt[b, :len(tokens) - 1] = tokens[1:]
            last_b[b] = len(tokens) - 1
            last_targets_bk[b, :len(targets)] = targets
            prompt_length_b[b] = prompt_length
        arrays = [sharding_lib.from_host(a, sharding) for a, sharding in (
            (inputs_bt, self.shardings.batch), (targets_bt, self.shardings.batch), (last_b, self._rows_sharding),
            (last_targets_bk, self._rows_sharding), (prompt_length_b, self._rows_sharding))]
        scores = jax.device_get(self._score(self.params, *arrays))
        return tuple(np.asarray(score)[:len(rows)] for score in scores)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            for context, continuation in map(harness_utils.make_disjoint_window, harness_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self._max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (log_prob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[owner] += log_prob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # Generation -------------------------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        collator = harness_model_utils.Collator(
            [request.args for request in requests], sort_fn=lambda args: (-len(self.tok_encode(args[0])), args[0]),
            group_by="gen_kwargs", group_fn=lambda args: args[1])
        results = []
        progress = tqdm(total=len(requests), disable=disable_tqdm or jax.process_index() != 0,
                        desc="lm: generate_until requests")
        for chunk in collator.get_batched(n=self._batch_size):
            contexts, all_kwargs = zip(*chunk)
            settings = harness_model_utils.normalize_gen_kwargs(all_kwargs[0], self._max_gen_toks)
            until, max_new_tokens = settings.pop("until"), settings.pop("max_gen_toks")
            sampling = self._sampling(settings)
            context_room = self._max_length - max_new_tokens
            if context_room < 1:
                raise ArgumentError(f"max_gen_toks={max_new_tokens} leaves no room for a context in "
                                    f"max_length={self._max_length}")
            prompts = [self.tok_encode(context, left_truncate_len=context_room) or [self.prefix_token_id]
                       for context in contexts]
            # Full batches of bucketed prompt lengths: a handful of compiled shapes (filler rows are dropped).
            filled = prompts + [prompts[0]] * (self._rows - len(prompts))
            new_ids = generate_lib.generate(
                self.config, self.params, filled, max_new_tokens=max_new_tokens, sampling=sampling, seed=self._seed,
                eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id or 0, mesh=self.shardings.mesh,
                stop_ids=self._stop_token_ids(tuple(until)),
                prompt_length=bucket_length(max(map(len, prompts)), context_room))
            for context, kwargs, ids in zip(contexts, all_kwargs, new_ids):
                text = harness_model_utils.postprocess_generated_text(self.tokenizer.decode(ids), until, None)
                self.cache_hook.add_partial("generate_until", (context, kwargs), text)
                results.append(text)
            progress.update(len(chunk))
        progress.close()
        return collator.get_original(results)

    @staticmethod
    def _sampling(settings: dict) -> generate_lib.Sampling:
        """lm's sampler for the harness's normalized generation kwargs (greedy unless `do_sample`)."""
        ignored = sorted(set(settings) - {"do_sample", "temperature", "top_k", "top_p"})
        if ignored:
            log.warning("lm's sampler ignores the generation kwargs %s", ignored)
        if not settings.get("do_sample"):
            return generate_lib.Sampling()
        return generate_lib.Sampling(float(settings.get("temperature", 1.0)), int(settings.get("top_k") or 0),
                                     float(settings.get("top_p") or 1.0))

    def _stop_token_ids(self, until: tuple[str, ...]) -> tuple[int, ...]:
        """Ids whose text alone holds a stop sequence: a row that samples one has met its stop sequence, so it can
        stop (the text is cut at the stop sequence either way)."""
        stops = [s for s in until if s]
        if stops and until not in self._stop_ids:
            self._stop_ids[until] = tuple(i for i in range(self.tokenizer.vocab_size)
                                          if any(s in self.tokenizer.decode([i]) for s in stops))
        return self._stop_ids.get(until, ())


def _scorer(config, shardings: sharding_lib.Shardings, rows_sharding):
    """The jitted `(params, inputs_bt, targets_bt, last_b, last_targets_bk, prompt_length_b) -> (log_prob_bt,
    is_argmax_bt, last_log_prob_bk, last_is_argmax_bk)` (`lm.objective.target_log_probs`), replicated on every
    device."""
    model = model_lib.build(config)

    def score(params, inputs_bt, targets_bt, last_b, last_targets_bk, prompt_length_b):
        with shardings.activation_rules():
            (log_prob_bt, is_argmax_bt), (last_log_prob_bk, last_is_argmax_bk) = objective.target_log_probs(
                params, inputs_bt, targets_bt, model, config, candidates=(last_b, last_targets_bk),
                prompt_length_b=prompt_length_b)
        return log_prob_bt, is_argmax_bt, last_log_prob_bk, last_is_argmax_bk

    batch = shardings.batch
    return jax.jit(score, in_shardings=(shardings.params, batch, batch, rows_sharding, rows_sharding, rows_sharding),
                   out_shardings=shardings.replicated)


def _positive_int(value, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        hint = " (lm has no 'auto' batch size)" if name == "batch_size" else ""
        raise ArgumentError(f"{name}={value!r}: expected a positive integer{hint}") from None
    if number < 1 or number != float(value):
        raise ArgumentError(f"{name}={value!r}: expected a positive integer")
    return number


def save_results(results: dict) -> str | None:
    """Writes the harness's results (`simple_evaluate`'s dict, per-sample logs left out) as
    `eval_harness_<step>.json` into the workdir of the `HarnessModel` that produced them; returns the path (None
    when the results are not an lm model's, or on processes other than 0)."""
    info = (results or {}).get("config", {})
    if "workdir" not in info or "step" not in info or jax.process_index() != 0:
        return None
    path = paths.resolve(info["workdir"], f"eval_harness_{info['step']}.json")
    saved = {key: value for key, value in results.items() if key != "samples"}
    paths.write_atomic(path, json.dumps(saved, indent=2, default=harness_utils.handle_non_serializable,
                                        ensure_ascii=False))
    return str(path)
