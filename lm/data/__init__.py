"""Data: sources, tokenizer, packing, per-process batches with checkpointable iterators.

- `lm.data.sources`: TFDS datasets by name, local text files and the built-in default corpus (all read as TFDS
  datasets), their splits, shards and shuffling; the data errors.
- `lm.data.text_files`: the TFDS builder over local files (imports tensorflow_datasets; loaded lazily).
- `lm.data.tokenizer`: SentencePiece models: load, train (`python -m lm.data.tokenizer`), cache; vocabulary checks.
- `lm.data.packing`: documents -> fixed-length examples (`inputs`, `targets`, `segment_ids`, `positions`, `weights`).
- `lm.data.pipeline`: `make_train_iterator` / `make_eval_iterator` (per-process batches, `get_state`/`set_state`)
  and `to_global_arrays` (global `jax.Array`s).

Nothing here imports TensorFlow at import time; TFRecord datasets import it when read. The synthetic source and the
default corpus work without TensorFlow installed.
"""
