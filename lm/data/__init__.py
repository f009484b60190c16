"""Data: sources, tokenizer, packing, per-process batches with checkpointable iterators.

- `lm.data.sources`: TFDS datasets by name, local text files and the built-in default corpus (all read as TFDS
  datasets), their splits, shards and shuffling (`resolve` a split once, then pass it on).
- `lm.data.text_files`: what a document of local files is, its key and split, the default corpus (pure Python).
- `lm.data.text_files_builder`: the TFDS builder over local files (imports tensorflow_datasets; loaded lazily).
- `lm.data.tokenizer`: loading a SentencePiece model (a file, a run's `workdir/tokenizer.model`) and reading it:
  vocabulary checks, fingerprint, the bytes each piece stands for. All that evaluation and sampling need.
- `lm.data.tokenizer_training`: training one on the train split and caching it (`python -m
  lm.data.tokenizer_training`); `get_or_train`, the trainer's choice of tokenizer.
- `lm.data.packing`: documents -> fixed-length examples (`inputs`, `targets`, `segment_ids`, `positions`,
  `weights`) in the `pack`, `pad` or `windows` layout.
- `lm.data.pipeline`: `make_train_iterator` / `make_eval_iterator` (per-process batches, `get_state`/`set_state`)
  and `to_global_arrays` (global `jax.Array`s).

Imports only go down this list's dependencies: `text_files` <- `sources` <- `tokenizer_training`; `tokenizer` needs
none of them; `pipeline` uses `sources`, `tokenizer` and `packing`. Nothing here imports TensorFlow at import time;
TFRecord datasets import it when read. The synthetic source and the default corpus work without TensorFlow.
"""

# A preference batch's optional fp32 `[rows, length]` feature beside `packing.FEATURES`: the precomputed reference
# log-probabilities DPO reads (`lm.data.preference`, `lm.dpo`). Here so that `lm.dpo` needs no data module.
REFERENCE_FEATURE = "reference_log_probs"
