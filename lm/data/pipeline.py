"""The input pipeline: per-process batches of packed examples, a checkpointable iterator, global `jax.Array`s.

    documents (lm.data.sources) -> tokenize -> pack / pad (lm.data.packing) -> batch -> prefetch thread

`make_train_iterator(config)` / `make_eval_iterator(config)` return a `BatchIterator`. Each `next()` gives this
process's slice of the global batch, a dict of numpy arrays:

    inputs, targets, segment_ids, positions   int32   [B_local, L]
    weights                                   float32 [B_local, L]

with L = `config.data.seq_len` and B_local = `config.data.batch_size // process_count` (feature meanings:
`lm.data.packing`). `to_global_arrays(batch, sharding)` turns it into global arrays of shape [B, L] with
`jax.make_array_from_process_local_data`; process p's rows are rows [p * B_local, (p + 1) * B_local) of the global
batch when the batch axis is sharded over all devices in process order (the usual `('data', 'fsdp')` layout).

Sharding across hosts: process p reads only its shard of the documents (`lm.data.sources.documents`); the shards
are disjoint and together cover the split.

The caller gives the tokenizer (`lm.data.tokenizer_training.get_or_train` for a training run, the workdir's copy for
evaluation) and may give the split already resolved (`lm.data.sources.resolve`), so nothing is looked up twice.

Training batches are shuffled and endless, laid out by `config.data.pack` (`pack` or `pad`, `lm.data.packing`).
Evaluation batches (`make_eval_iterator`) are the eval split in storage order, once, in the `windows` layout (every
target token exactly once, its loss independent of the process count); the stream ends after the last batch,
which is filled up with padding rows.

Determinism and resume: the pipeline has no source of randomness besides `config.seed` (grain shuffles by seed; the
thread pools keep order), so for a fixed config and process layout the batch at step s is a function of (seed, s).
`BatchIterator.get_state()` is a small JSON-serializable dict:

    {"version": 1, "step": <batches returned>, "meta": {...what the stream depends on...},
     "pipeline": <grain iterator state: positions in the document stream and inside the packer>}

and `set_state()` on a fresh iterator built from the same config continues with exactly the batches an
uninterrupted iterator would have returned. Save it with the model checkpoint, per process, e.g. with orbax and
grain's handler: `ocp.args.Composite(state=..., data=grain.checkpoint.CheckpointSave(iterator))` (writes
`process_<i>-of-<n>.json`), restore with `grain.checkpoint.CheckpointRestore(iterator)`; or as plain JSON
(`ocp.args.JsonSave(iterator.get_state())`) in single-process runs. Restoring a state saved under a different
config (source, tokenizer, seq_len, batch size, seed, process layout) raises `IteratorStateError` naming the field:
the stream would differ, so an exact resume is impossible.

`source='synthetic'`: uniform random tokens in [0, config.model.vocab_size), one document per row (segment 1,
positions 0..L-1, all weights 1); the global batch of step s comes from `numpy.random.default_rng([seed, s])` and
each process keeps its rows, so it does not depend on the process count; no tokenizer, no TensorFlow, state
`{"step": s}`.
"""

from __future__ import annotations

import atexit
import dataclasses
import weakref
from typing import Any

from absl import logging
import grain
import jax
import ml_collections
import numpy as np

from lm.data import REFERENCE_FEATURE, packing, preference, sft, sources
from lm.data import tokenizer as tokenizer_lib
from lm.errors import ArgumentError, ConfigError, EmptyDatasetError, IteratorStateError

STATE_VERSION = 1
# Iterators still open at exit are closed while the interpreter is intact (grain's prefetch thread otherwise fails
# noisily in `__del__` during interpreter teardown).
_OPEN_ITERATORS: "weakref.WeakSet[BatchIterator]" = weakref.WeakSet()


@atexit.register
def _close_open_iterators() -> None:
    for iterator in list(_OPEN_ITERATORS):
        iterator.close()


def check_config(config: ml_collections.ConfigDict, process_index: int, process_count: int) -> int:
    """The checks that need no data; returns the per-process batch size. Raises ConfigError naming the field."""
    d = config.data
    if d.seq_len > config.model.max_seq_len:
        raise ConfigError(
            f"config.data.seq_len={d.seq_len} is longer than config.model.max_seq_len={config.model.max_seq_len}")
    if d.seq_len < 1:
        raise ConfigError(f"config.data.seq_len must be a positive integer, got {d.seq_len!r}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
    if d.batch_size % process_count:
        raise ConfigError(
            f"config.data.batch_size={d.batch_size} (global) is not divisible by the {process_count} processes")
    return d.batch_size // process_count


@dataclasses.dataclass(frozen=True)
class _Tokenize:
    """`str` document -> `{'tokens': int32 [n]}`, `[BOS] + ids + [EOS]` (no BOS if the tokenizer has none)."""

    tokenizer: tokenizer_lib.Tokenizer

    def __call__(self, text: str) -> dict[str, np.ndarray]:
        bos = [] if self.tokenizer.bos_id is None else [self.tokenizer.bos_id]
        ids = bos + self.tokenizer.encode(text) + [self.tokenizer.eos_id]
        return {"tokens": np.asarray(ids, dtype=np.int32)}


def pad_id_of(tokenizer: tokenizer_lib.Tokenizer | None) -> int:
    """The id padding rows hold (weight 0, so any id would do): the tokenizer's padding id, else 0."""
    return 0 if tokenizer is None or tokenizer.pad_id is None else tokenizer.pad_id


def _stack(examples: list[dict[str, np.ndarray]], rows: int, padding: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # A finite stream's last batch is filled with all-padding rows (weights 0), so every batch has `rows` rows.
    examples = examples + [padding] * (rows - len(examples))
    return {k: np.stack([e[k] for e in examples]) for k in packing.FEATURES}


class BatchIterator(grain.DatasetIterator):
    """Iterator over this process's batches (module docstring), with `get_state` / `set_state` for checkpoints.

    Attributes:
      local_batch_size: rows per batch in this process.
      global_batch_size: rows per step across processes (`config.data.batch_size`).
      seq_len: L.
      tokenizer: the SentencePiece model (None for `synthetic`).
      step: batches returned so far (restored by `set_state`).
    """

    def __init__(self, inner: grain.DatasetIterator, *, meta: dict[str, Any], local_batch_size: int,
                 global_batch_size: int, seq_len: int, tokenizer: tokenizer_lib.Tokenizer | None,
                 float_features: tuple[str, ...] = ()):
        super().__init__(inner)
        self._float_features = float_features  # Batch features beyond `packing.FEATURES` (fp32 [rows, length]).
        self._inner = inner
        self._meta = meta
        self.local_batch_size = local_batch_size
        self.global_batch_size = global_batch_size
        self.seq_len = seq_len
        self.tokenizer = tokenizer
        self.step = 0
        _OPEN_ITERATORS.add(self)

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._inner)
        self.step += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "step": self.step, "meta": dict(self._meta),
                "pipeline": self._inner.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise IteratorStateError(
                f"data iterator state version {state.get('version')!r} is not {STATE_VERSION}")
        saved = state.get("meta", {})
        for key, value in self._meta.items():
            if saved.get(key) != value:
                raise IteratorStateError(
                    f"data iterator state was saved with {key}={saved.get(key)!r} but this pipeline has "
                    f"{key}={value!r}; the batch stream would differ, so it cannot resume exactly")
        self._inner.set_state(packing.restore_state_types(state["pipeline"]))
        self.step = int(state["step"])

    def padding_batch(self) -> dict[str, np.ndarray]:
        """A batch of all-padding rows (weights 0): what a process whose finite stream has ended feeds to a step
        that every process runs together."""
        pad_id = pad_id_of(self.tokenizer)
        batch = _stack([], self.local_batch_size, packing.padding_example(self.seq_len, pad_id))
        return {**batch, **{name: np.zeros((self.local_batch_size, self.seq_len), np.float32)
                            for name in self._float_features}}

    def close(self) -> None:
        """Stops the background thread and releases the pipeline; the iterator cannot be used afterwards.

        Also done when the iterator is garbage-collected, and at interpreter exit.
        """
        inner = getattr(self, "_inner", None)
        if inner is None:
            return
        # Drop the references too, so the grain iterators are collected now, not during interpreter teardown.
        self._inner, self._parents = None, ()
        inner.close()


class _SyntheticIterator(grain.DatasetIterator):
    """Random tokens. The global batch at step s is drawn from `default_rng([seed, s])` and each process keeps its
    rows, so the global batch is the same for any number of processes (multi-process runs match one process)."""

    def __init__(self, *, seed: int, process_index: int, process_count: int, rows: int, seq_len: int,
                 vocab_size: int):
        super().__init__()
        self._seed, self._process_index, self._process_count = seed, process_index, process_count
        self._rows, self._seq_len, self._vocab_size = rows, seq_len, vocab_size
        self._step = 0

    def __next__(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self._seed, self._step])
        global_rows = self._rows * self._process_count
        tokens_bw = rng.integers(0, self._vocab_size, (global_rows, self._seq_len + 1), dtype=np.int32)
        tokens_bw = tokens_bw[self._process_index * self._rows:(self._process_index + 1) * self._rows]
        self._step += 1
        shape = (self._rows, self._seq_len)
        return {
            "inputs": tokens_bw[:, :-1],
            "targets": tokens_bw[:, 1:],
            "segment_ids": np.ones(shape, np.int32),
            "positions": np.broadcast_to(np.arange(self._seq_len, dtype=np.int32), shape).copy(),
            "weights": np.ones(shape, np.float32),
        }

    def get_state(self) -> dict[str, Any]:
        return {"step": self._step}

    def set_state(self, state: dict[str, Any]) -> None:
        self._step = int(state["step"])


def make_iterator(
    config: ml_collections.ConfigDict,
    split: str | sources.ResolvedSplit,
    *,
    tokenizer: tokenizer_lib.Tokenizer | None,
    shuffle: bool = True,
    layout: str | None = None,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    prefetch: int = 2,
) -> BatchIterator:
    """This process's batches of one split of `config.data.source` (module docstring).

    Args:
      config: the run config (`config.data.*`, `config.model.{vocab_size, max_seq_len}`, `config.seed`).
      split: a TFDS split spec such as `config.data.train_split`, or that split already resolved.
      tokenizer: the SentencePiece model the documents are encoded with (None only for `source='synthetic'`).
      shuffle: shuffle documents (seeded by `config.seed` and the split); False: storage order.
      layout: `pack`, `pad` or `windows` (`lm.data.packing`); default `pack` if `config.data.pack` else `pad`.
      num_epochs: passes over the data; None: forever. A finite stream ends with a batch filled up with padding
        rows; processes may then run out at different steps (their shards differ in size).
      process_index, process_count: default `jax.process_index()`, `jax.process_count()`; pass them to simulate
        other processes.
      prefetch: batches prepared ahead in a background thread; 0 disables the thread.

    Raises:
      ConfigError: seq_len > max_seq_len, batch_size not divisible by process_count, tokenizer larger than the
        model vocabulary, missing fields.
      lm.data.sources.DataError subclasses: unknown dataset or split, no files, no text field, empty split.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    rows = check_config(config, process_index, process_count)
    seq_len = config.data.seq_len
    split_name = split.split if isinstance(split, (sources.ResolvedSplit, sft.SftSplit)) else split
    seed = sources.shuffle_seed(config.seed, split_name)
    meta = {"process_count": process_count, "process_index": process_index, "source": config.data.source,
            "split": split_name, "seq_len": seq_len, "local_batch_size": rows, "seed": seed}
    common = dict(local_batch_size=rows, global_batch_size=config.data.batch_size, seq_len=seq_len)

    if config.data.source == "synthetic":
        inner = _SyntheticIterator(seed=seed, process_index=process_index, process_count=process_count, rows=rows,
                                   seq_len=seq_len, vocab_size=config.model.vocab_size)
        return BatchIterator(inner, meta=meta, tokenizer=None, **common)

    # Checks name, split, files, field, emptiness before any work.
    resolved = split if isinstance(split, (sources.ResolvedSplit, sft.SftSplit)) else sources.resolve(config, split)
    if tokenizer is None:
        raise ArgumentError(f"config.data.source={config.data.source!r} needs a tokenizer (tokenizer=None)")
    tokenizer_lib.check_vocab_size(tokenizer, config)
    if isinstance(resolved, sft.SftSplit):
        layout = ("pack" if config.data.pack else "pad") if layout in (None, "windows") else layout
        meta.update(source=resolved.fingerprint, tokenizer=tokenizer.fingerprint(), layout=layout,
                    shuffle=bool(shuffle))
        padding = packing.padding_example(seq_len, pad_id_of(tokenizer))
        if resolved.format == "preference":  # Pairs of rows, always padded (`lm.data.preference`).
            meta.update(layout="pad")
            pairs = _fine_tuning_examples(config, resolved, tokenizer, shuffle=shuffle, seed=seed,
                                          num_epochs=num_epochs, process_index=process_index,
                                          process_count=process_count)
            pairs = pairs.map(lambda pair: preference.to_rows(pair, seq_len, pad_id_of(tokenizer)))
            batches = pairs.batch(rows // 2, drop_remainder=False,
                                  batch_fn=lambda e: preference.stack(list(e), rows, padding))
            if sft.reads_reference_log_probs(config):
                common["float_features"] = (REFERENCE_FEATURE,)
        else:
            rows_ds = _sft_rows(config, resolved, tokenizer, layout, shuffle=shuffle, seed=seed,
                                num_epochs=num_epochs, process_index=process_index, process_count=process_count,
                                rows=rows)
            batches = rows_ds.batch(rows, drop_remainder=False, batch_fn=lambda e: _stack(list(e), rows, padding))
        if prefetch > 0:
            batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=prefetch)
        return BatchIterator(iter(batches), meta=meta, tokenizer=tokenizer, **common)
    if tokenizer.eos_id is None:
        raise ConfigError("the tokenizer has no EOS token; documents are EOS-terminated")
    layout = ("pack" if config.data.pack else "pad") if layout is None else layout
    if layout not in packing.LAYOUTS:
        raise ArgumentError(f"layout={layout!r} is not one of {', '.join(packing.LAYOUTS)}")
    pad_id = pad_id_of(tokenizer)
    meta.update(source=resolved.fingerprint, tokenizer=tokenizer.fingerprint(), layout=layout,
                shuffle=bool(shuffle))

    docs = sources.documents(resolved, process_index=process_index, process_count=process_count, shuffle=shuffle,
                             seed=seed, num_epochs=num_epochs, shuffle_buffer=config.data.shuffle_buffer)
    token_docs = docs.map(_Tokenize(tokenizer))
    if layout == "pack":
        examples = packing.pack(token_docs, seq_len)
    elif layout == "pad":
        examples = packing.pad(token_docs, seq_len, pad_id)
    else:
        examples = packing.pack_windows(token_docs, seq_len, rows)
    padding = packing.padding_example(seq_len, pad_id)
    batches = examples.batch(rows, drop_remainder=False, batch_fn=lambda e: _stack(list(e), rows, padding))
    if prefetch > 0:
        batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=prefetch)
    return BatchIterator(iter(batches), meta=meta, tokenizer=tokenizer, **common)


def _fine_tuning_examples(config, split: sft.SftSplit, tokenizer, *, shuffle: bool, seed: int,
                          num_epochs: int | None, process_index: int, process_count: int) -> grain.IterDataset:
    """This process's share of the split's tokenized examples (`lm.data.sft`; pairs for `lm.data.preference`),
    shuffled every epoch; what was truncated or dropped is logged once."""
    module = preference if split.format == "preference" else sft
    tokenized = module.examples(config, split, tokenizer)
    if process_index == 0:
        logging.info("%s", tokenized.report(split, config.data.seq_len))
    if not tokenized.examples[process_index::process_count]:
        raise EmptyDatasetError(f"{split.description} has {len(tokenized.examples)} {tokenized.unit}, none for "
                                f"process {process_index} of {process_count}")
    ds = grain.MapDataset.source(tokenized.examples)[process_index::process_count]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    return ds.repeat(num_epochs).to_iter_dataset()


def _sft_rows(config, split: sft.SftSplit, tokenizer, layout: str, *, shuffle: bool, seed: int,
              num_epochs: int | None, process_index: int, process_count: int, rows: int) -> grain.IterDataset:
    """Rows of whole fine-tuning examples (`lm.data.sft`): packed first-fit (`pack`) or one per padded row
    (`pad`)."""
    examples = _fine_tuning_examples(config, split, tokenizer, shuffle=shuffle, seed=seed, num_epochs=num_epochs,
                                     process_index=process_index, process_count=process_count)
    seq_len, pad_id = config.data.seq_len, pad_id_of(tokenizer)
    if layout == "pad":
        return examples.map(lambda example: sft.to_example(example, seq_len, pad_id))
    packed = grain.experimental.FirstFitPackIterDataset(
        examples, length_struct={"tokens": seq_len + 1, "trained": seq_len + 1}, num_packing_bins=rows,
        shuffle_bins=False)
    return packed.map(lambda row: sft.to_example(row, seq_len, pad_id))


def make_train_iterator(config: ml_collections.ConfigDict, *, tokenizer: tokenizer_lib.Tokenizer | None,
                        split: sources.ResolvedSplit | None = None, **kwargs) -> BatchIterator:
    """Shuffled, endless batches of `config.data.train_split` (or of `split`, that split resolved), laid out by
    `config.data.pack`."""
    return make_iterator(config, config.data.train_split if split is None else split, tokenizer=tokenizer,
                         **{"shuffle": True, **kwargs})


def make_eval_iterator(config: ml_collections.ConfigDict, *, tokenizer: tokenizer_lib.Tokenizer | None,
                       split: sources.ResolvedSplit | None = None, **kwargs) -> BatchIterator:
    """The evaluation stream of `config.data.eval_split` (or of `split`, that split resolved): storage order, one
    pass, `windows` layout (module docstring), so a fresh iterator gives the same batches every time. For
    `source='synthetic'`, endless random batches."""
    return make_iterator(config, config.data.eval_split if split is None else split, tokenizer=tokenizer,
                         **{"shuffle": False, "layout": "windows", "num_epochs": 1, **kwargs})


def to_global_arrays(local_batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding
                     ) -> dict[str, jax.Array]:
    """This process's [B_local, L] arrays -> global [B_local * process_count, L] `jax.Array`s with `sharding`.

    Every process calls it with its own slice (collectively); no data moves between hosts.
    """
    count = jax.process_count()
    return {k: jax.make_array_from_process_local_data(sharding, v, (v.shape[0] * count, *v.shape[1:]))
            for k, v in local_batch.items()}
