"""Document sources: TFDS datasets by name, local text files, the built-in default corpus (and where each is cached).

Every text source is a TFDS dataset, so one path reads them all:

- `source='tfds'`: `tfds.builder(config.data.name, data_dir=config.data.data_dir)` (local or `gs://`), any split spec
  TFDS accepts (`train`, `train[:1%]`, `validation+test`), documents in `config.data.text_field`. Nothing is ever
  downloaded: a dataset that is not prepared in `data_dir` is an error that says how to prepare it (`tfds build`).
- `source='files'`: the files matching `config.data.files` (comma-separated globs, `**` allowed), made into the
  `lm_text_files` TFDS builder (`lm.data.text_files_builder`), prepared once under `data_dir` or the cache directory.
- `source='default'`: the same builder over a fixed set of files every CPython installation carries.

A resolved split (`resolve`) becomes a grain dataset of document strings (`documents`):
- random-access storage (ArrayRecord: the file builders, and TFDS datasets prepared with
  `--file_format=array_record`): `grain.MapDataset` over the split, this process's shard `[process_index::
  process_count]`, a fresh global permutation every epoch (`MapDataset.shuffle(seed).repeat()`);
- sequential storage (TFRecord: most datasets on `gs://tfds-data`, e.g. `lm1b`, `c4`): this process reads a
  contiguous `1/process_count` of the split with tf.data, files in order, and grain shuffles within windows of
  `config.data.shuffle_buffer` documents. Its position (epoch, documents read) is the checkpoint; a restore opens
  the split at that position with TFDS slicing (`train[a:b]`), so resuming costs no re-reading.
Both are grain datasets with JSON-serializable iterator state, which `lm.data.pipeline` saves with the checkpoint.

What a document of local files is, which split it falls in, and the default corpus: `lm.data.text_files`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import grain
import ml_collections
import numpy as np

from lm.data.text_files import default_corpus_spec, files_spec, split_hash
from lm.errors import (ConfigError, DataError, DatasetNotFoundError, EmptyDatasetError, FilesNotFoundError,
                       SplitNotFoundError, TextFieldError)


def cache_root(config: ml_collections.ConfigDict) -> str:
    """Directory for prepared file datasets and trained tokenizers.

    `config.data.cache_dir` if set, else `$LM_CACHE_DIR`, else
    `~/.cache/lm`.
    """
    path = (config.data.cache_dir or os.environ.get("LM_CACHE_DIR")
            or os.path.join(os.path.expanduser("~"), ".cache", "lm"))
    return os.path.abspath(path)


# ---------------------------------------------------------------------------------------------------------------
# Resolving a configured split.


@dataclasses.dataclass(frozen=True)
class ResolvedSplit:
    """One split of the configured source, checked: it exists, has documents and the text field.

    Attributes:
      builder: the `tfds.core.DatasetBuilder`.
      split: TFDS split spec, e.g. `train` or `train[:10%]`.
      text_field: feature holding the document text.
      num_documents: documents in the split.
      description: what it is, for messages (`default corpus`, `tfds lm1b`, `files /data/*.txt`).
      fingerprint: names the exact documents (builder full name and split): cache keys, iterator-state checks.
      random_access: stored as ArrayRecord (grain reads any document); else TFRecord, read in order.
    """

    builder: Any
    split: str
    text_field: str
    num_documents: int
    description: str
    fingerprint: str
    random_access: bool


def _prepared_data_dir(config: ml_collections.ConfigDict) -> str:
    return config.data.data_dir or os.path.join(cache_root(config), "tfds")


def _tfds_builder(config: ml_collections.ConfigDict):
    import tensorflow_datasets as tfds  # Lazy: TFDS is only needed for text sources.

    name, data_dir = config.data.name, config.data.data_dir
    if not name:
        raise ConfigError("config.data.source='tfds' needs config.data.name, a TFDS dataset such as 'lm1b'")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        first_line = str(e).strip().splitlines()[0]
        raise DatasetNotFoundError(f"config.data.name={name!r}: no TFDS dataset of that name ({first_line})") from None
    if not builder.is_prepared():
        raise DatasetNotFoundError(
            f"config.data.name={name!r} is not prepared in data_dir={builder.data_dir_root!r}; lm never downloads "
            f"data: prepare it with `tfds build {name} --data_dir=DIR` and set config.data.data_dir=DIR")
    return builder


def resolve(config: ml_collections.ConfigDict, split: str) -> ResolvedSplit:
    """Finds and checks one split of `config.data.source`; prepares file datasets on first use. Fine-tuning
    formats (`config.data.format` other than `text`) give `lm.data.sft.SftSplit` instead.

    Raises (one-line messages): `ConfigError` (a needed field is unset), `DatasetNotFoundError`,
    `SplitNotFoundError`, `FilesNotFoundError`, `TextFieldError`, `EmptyDatasetError`.
    """
    if config.data.format != "text":  # Fine-tuning records (JSON lines), not documents.
        from lm.data import sft

        return sft.resolve(config, split)
    source = config.data.source
    if source == "synthetic":
        raise ConfigError("config.data.source='synthetic' has no documents (it makes random tokens)")
    if source == "tfds":
        builder = _tfds_builder(config)
        text_field, description = config.data.text_field, f"tfds {config.data.name}"
        features = builder.info.features
        if text_field not in features.keys():
            raise TextFieldError(
                f"config.data.text_field={text_field!r} is not a feature of {config.data.name}; it has "
                f"{sorted(features.keys())}")
    elif source in ("files", "default"):
        from lm.data import text_files_builder  # Lazy: imports tensorflow_datasets.

        spec = files_spec(config) if source == "files" else default_corpus_spec()
        builder = text_files_builder.prepare(spec, _prepared_data_dir(config))
        text_field = "text"
        description = f"files {config.data.files}" if source == "files" else "default corpus"
    else:
        raise ConfigError(f"config.data.source={source!r} is not one of default, tfds, files, synthetic")

    try:
        num_documents = max(0, builder.info.splits[split].num_examples)
    except (KeyError, ValueError, AssertionError) as e:
        missing = _split_names(split) - set(builder.info.splits.keys())
        if source != "tfds" and missing and missing <= {"train", "validation"}:
            # The file builder leaves out a split without documents (TFDS cannot store an empty split).
            raise EmptyDatasetError(f"split {split!r} of {description} has no documents") from None
        raise SplitNotFoundError(
            f"split {split!r} of {description} does not exist or is malformed (splits: "
            f"{sorted(builder.info.splits.keys())}; {str(e).strip().splitlines()[0]})") from None
    if num_documents == 0:
        raise EmptyDatasetError(f"split {split!r} of {description} has no documents")
    file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
    return ResolvedSplit(
        builder=builder, split=split, text_field=text_field, num_documents=num_documents, description=description,
        fingerprint=f"{builder.info.full_name}:{split}", random_access=file_format == "array_record")


def _split_names(split: str) -> set[str]:
    """The split names in a TFDS split spec: `train[:10%]+validation` -> {train, validation}."""
    return {part.split("[")[0].strip() for part in split.split("+")}


# ---------------------------------------------------------------------------------------------------------------
# Documents as a grain dataset.


def _decode(text: bytes | str) -> str:
    return text.decode("utf-8") if isinstance(text, bytes) else text


def documents(
    resolved: ResolvedSplit,
    *,
    process_index: int = 0,
    process_count: int = 1,
    shuffle: bool = True,
    seed: int = 0,
    num_epochs: int | None = None,
    shuffle_buffer: int = 1024,
) -> grain.IterDataset:
    """This process's documents (str) of a split, as a checkpointable grain dataset.

    Args:
      resolved: from `resolve`.
      process_index, process_count: this process reads a disjoint shard; the shards cover the split.
      shuffle: random-access storage: a new global permutation of the shard every epoch; sequential storage:
        shuffled within windows of `shuffle_buffer` documents. False: storage order.
      seed: shuffle seed, 0 <= seed < 2**32.
      num_epochs: passes over the shard; None repeats forever.

    Raises:
      EmptyDatasetError: the shard of this process is empty (fewer documents than processes).
    """
    if resolved.random_access:
        # Ranges of documents are read by index, so this shard can be any subset: take every process_count-th.
        count = len(range(process_index, resolved.num_documents, process_count))
    else:
        start, stop = _contiguous_shard(resolved.num_documents, process_index, process_count)
        count = stop - start
    if count == 0:
        raise EmptyDatasetError(
            f"split {resolved.split!r} of {resolved.description} has {resolved.num_documents} documents, none for "
            f"process {process_index} of {process_count}")
    if resolved.random_access:
        data_source = resolved.builder.as_data_source(split=resolved.split)
        ds = grain.MapDataset.source(data_source)[process_index::process_count]
        if shuffle:
            # MapDataset.shuffle combines the seed with the epoch: each epoch gets its own permutation.
            ds = ds.shuffle(seed=seed)
        ds = ds.repeat(num_epochs)
        field = resolved.text_field
        return ds.map(lambda example: _decode(example[field])).to_iter_dataset()
    ds = TfdsSequentialDataset(resolved, process_index=process_index, process_count=process_count,
                               num_epochs=num_epochs)
    if shuffle:
        ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=max(1, shuffle_buffer), seed=seed)
    return ds


def iter_texts(resolved: ResolvedSplit, max_chars: int | None = None) -> Iterator[str]:
    """The documents of a whole split in storage order, once; stops after `max_chars` characters if given."""
    it = iter(documents(resolved, shuffle=False, num_epochs=1))
    total = 0
    for text in it:
        yield text
        total += len(text)
        if max_chars is not None and total >= max_chars:
            return


def _contiguous_shard(n: int, index: int, count: int) -> tuple[int, int]:
    """[start, stop) of shard `index` when n items are cut into `count` contiguous shards differing by <= 1."""
    return index * n // count, (index + 1) * n // count


class TfdsSequentialDataset(grain.IterDataset):
    """Documents of a TFRecord-stored TFDS split, this process's contiguous shard, read in storage order.

    Iterator state: `{'epoch': completed passes, 'index': documents returned in this pass}`. Setting a state opens
    the split at that document (`split[a:b]` with absolute indices; TFDS skips whole files), so a restore does not
    re-read what came before. tf.data reads files one after another (`interleave_cycle_length=1`) so that the
    storage order, which TFDS slicing counts in, is the order returned.
    """

    def __init__(self, resolved: ResolvedSplit, *, process_index: int, process_count: int,
                 num_epochs: int | None):
        super().__init__()
        import tensorflow_datasets as tfds

        instructions = tfds.core.ReadInstruction.from_spec(resolved.split).to_absolute(resolved.builder.info.splits)
        if len(instructions) != 1:
            raise ConfigError(
                f"split {resolved.split!r} of {resolved.description}: TFRecord datasets are read in order and need "
                f"one split or slice (no '+'); prepare the dataset as array_record to combine splits")
        (inst,) = instructions
        begin = inst.from_ or 0
        end = resolved.builder.info.splits[inst.splitname].num_examples if inst.to is None else inst.to
        lo, hi = _contiguous_shard(end - begin, process_index, process_count)
        self._resolved = resolved
        self._split_name = inst.splitname
        self._start, self._stop = begin + lo, begin + hi
        self._num_epochs = num_epochs

    def __iter__(self) -> "_TfdsSequentialIterator":
        return _TfdsSequentialIterator(self)

    def __str__(self) -> str:
        return f"TfdsSequentialDataset({self._resolved.fingerprint}[{self._start}:{self._stop}])"


class _TfdsSequentialIterator(grain.DatasetIterator):

    def __init__(self, ds: TfdsSequentialDataset):
        super().__init__()
        self._ds = ds
        self._epoch = 0
        self._index = 0
        self._it = None

    def _open(self):
        import tensorflow_datasets as tfds

        ds = self._ds
        split = f"{ds._split_name}[{ds._start + self._index}:{ds._stop}]"
        read_config = tfds.ReadConfig(interleave_cycle_length=1, try_autocache=False)
        field = ds._resolved.text_field
        data = ds._resolved.builder.as_dataset(split=split, shuffle_files=False, read_config=read_config)
        self._it = data.map(lambda example: example[field]).as_numpy_iterator()

    def __next__(self) -> str:
        ds = self._ds
        if self._num_epochs_done():
            raise StopIteration
        if self._index >= ds._stop - ds._start:
            self._epoch, self._index, self._it = self._epoch + 1, 0, None
            if self._num_epochs_done():
                raise StopIteration
        if self._it is None:
            self._open()
        text = next(self._it)
        self._index += 1
        return _decode(text)

    def _num_epochs_done(self) -> bool:
        return self._ds._num_epochs is not None and self._epoch >= self._ds._num_epochs

    def get_state(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "index": self._index}

    def set_state(self, state: dict[str, Any]) -> None:
        self._epoch, self._index, self._it = int(state["epoch"]), int(state["index"]), None


def shuffle_seed(seed: int, *purpose: str) -> int:
    """A 32-bit seed derived from the run seed and a purpose (e.g. the split), as grain's shuffles take."""
    words = [int(seed) & 0xFFFFFFFF] + [split_hash(p) & 0xFFFFFFFF for p in purpose]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


__all__ = [
    "DataError", "DatasetNotFoundError", "SplitNotFoundError", "FilesNotFoundError", "EmptyDatasetError",
    "TextFieldError", "ResolvedSplit", "TfdsSequentialDataset", "cache_root", "documents", "iter_texts", "resolve",
    "shuffle_seed",
]
