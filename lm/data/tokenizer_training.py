"""Training a SentencePiece tokenizer on the configured source, and choosing the one a training run uses.

`get_or_train(config, train_split, workdir=...)` is what the trainer calls. It returns an `lm.data.tokenizer.Tokenizer`,
found in order:
1. the workdir's own (`tokenizer.model` or `tokenizer.json`), if the run already has one (a resumed run);
2. `config.data.tokenizer.path`: a SentencePiece `.model` file, a Hugging Face `tokenizer.json`, or a directory with
   either;
3. the cache: `<cache>/tokenizers/<source>-v<vocab>-<hash>.model`, where the hash covers the train split's documents
   (its fingerprint) and every training setting; trained there on first use (see `train`).
With a workdir, the tokenizer's files are copied into it, so the run keeps its own tokenizer (which is all that
evaluation and sampling load: `lm.data.tokenizer.from_workdir`).

Training (`train`, or `python -m lm.data.tokenizer_training --config=configs/tiny.py --output=PATH`) reads the train
split in
storage order, at most `max_chars` characters (default 20 M), as paragraphs (documents cut after blank lines, the
separators kept), and trains a SentencePiece model of `config.data.tokenizer.model_type` (default `bpe`) with:
- `vocab_size`, `pad_id`, `bos_id`, `eos_id`, `unk_id` (-1 disables one) and `byte_fallback` from
  `config.data.tokenizer`;
- lossless settings: no normalization (`identity`), whitespace kept as it is (`remove_extra_whitespaces=False`,
  whitespace-only pieces, so indentation becomes pieces such as `▁▁▁▁▁▁▁▁`), no dummy prefix, newlines learned
  inside pieces, digits split. With byte fallback, `decode(encode(text)) == text` for any text without U+2581 (`▁`,
  SentencePiece's space marker, which decodes to a space);
- one training thread: SentencePiece's result depends on the thread count, so a fixed count makes the cached model
  the same on every machine.
On the default corpus this takes about a second (BPE, vocabulary 2048).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Iterable, Iterator

import ml_collections
import sentencepiece as spm

from lm import paths
from lm.data import sources
from lm.data import tokenizer as tokenizer_lib
from lm.errors import ConfigError

DEFAULT_MAX_CHARS = 20_000_000
# SentencePiece options that make encoding lossless and training reproducible (see the module docstring).
_TRAINER_OPTIONS = dict(
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    allow_whitespace_only_pieces=True,
    split_digits=True,
    character_coverage=1.0,
    max_sentence_length=1 << 16,  # Bytes; longer paragraphs are skipped by the trainer (and logged).
    num_threads=1,
    minloglevel=2,
)


def training_settings(config: ml_collections.ConfigDict, max_chars: int = DEFAULT_MAX_CHARS) -> dict:
    """Everything that determines the trained model besides the documents (part of the cache key)."""
    t = config.data.tokenizer
    return dict(
        model_type=t.model_type,
        vocab_size=t.vocab_size,
        byte_fallback=t.byte_fallback,
        pad_id=t.pad_id,
        bos_id=t.bos_id,
        eos_id=t.eos_id,
        unk_id=t.unk_id,
        max_chars=max_chars,
        sentencepiece=spm.__version__,
        **_TRAINER_OPTIONS,
    )


def paragraphs(texts: Iterable[str]) -> Iterator[str]:
    """Cuts documents after each run of blank lines, keeping the separators: the trainer's "sentences"."""
    for text in texts:
        for paragraph in re.split(r"(?<=\n\n)(?=[^\n])", text):
            if paragraph:
                yield paragraph


def train(config: ml_collections.ConfigDict, train_split: sources.ResolvedSplit, output: str, *,
          max_chars: int = DEFAULT_MAX_CHARS) -> tokenizer_lib.SentencePieceTokenizer:
    """Trains a SentencePiece model on `train_split` (`sources.resolve(config, config.data.train_split)`) with the
    settings of `config.data.tokenizer` and writes it to `output`."""
    t = config.data.tokenizer
    if t.eos_id < 0:
        raise ConfigError("config.data.tokenizer.eos_id must be >= 0: documents are EOS-terminated")
    settings = training_settings(config, max_chars)
    del settings["max_chars"], settings["sentencepiece"]
    # Sentences are fed from an iterator, so the corpus is never written out as a text file.
    model = _train_from_texts(paragraphs(sources.iter_texts(train_split, max_chars=max_chars)), settings)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    # Write-then-rename, so processes that train the same model at once never read a partial file.
    paths.write_atomic(paths.resolve(output), model)
    return tokenizer_lib.SentencePieceTokenizer(spm.SentencePieceProcessor(model_proto=model))


def _train_from_texts(sentences: Iterable[str], settings: dict) -> bytes:
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=writer, **settings)
    except RuntimeError as e:
        raise ConfigError(f"SentencePiece training with config.data.tokenizer={settings} failed: {e}") from None
    return writer.getvalue()


def cached_path(config: ml_collections.ConfigDict, train_split: sources.ResolvedSplit,
                max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """Where the tokenizer trained on `train_split` with this config's settings is cached (whether or not it
    exists)."""
    key = json.dumps([train_split.fingerprint, training_settings(config, max_chars)], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", config.data.name if config.data.source == "tfds" else config.data.source)
    return os.path.join(sources.cache_root(config), "tokenizers",
                        f"{slug}-v{config.data.tokenizer.vocab_size}-{digest}.model")


def get_or_train(config: ml_collections.ConfigDict, train_split: sources.ResolvedSplit, *,
                 workdir: str | None = None) -> tokenizer_lib.Tokenizer:
    """The run's tokenizer: workdir copy, else `config.data.tokenizer.path`, else cached or trained on `train_split`
    (module docstring); copied to `workdir/tokenizer.model` when a workdir is given.

    Checks `config.model.vocab_size` against it (`lm.data.tokenizer.check_vocab_size`).
    """
    if workdir and tokenizer_lib.in_workdir(workdir):
        tokenizer = tokenizer_lib.from_workdir(workdir)
    else:
        if config.data.tokenizer.path:
            tokenizer = tokenizer_lib.load(config.data.tokenizer.path)
        else:
            path = cached_path(config, train_split)
            tokenizer = (tokenizer_lib.load(path, what="the cached tokenizer") if os.path.isfile(path)
                         else train(config, train_split, path))
        if workdir:
            tokenizer.save(workdir)
    tokenizer_lib.check_vocab_size(tokenizer, config)
    return tokenizer


def main(argv):
    """`python -m lm.data.tokenizer_training --config=configs/tiny.py --output=PATH`: train, report compression."""
    import time

    from absl import flags

    from lm import config as lm_config

    del argv
    config = lm_config.validate(flags.FLAGS.config)
    train_split = sources.resolve(config, config.data.train_split)
    output = flags.FLAGS.output or cached_path(config, train_split, flags.FLAGS.max_chars)
    start = time.perf_counter()
    tokenizer = train(config, train_split, output, max_chars=flags.FLAGS.max_chars)
    seconds = time.perf_counter() - start
    tokenizer_lib.check_vocab_size(tokenizer, config)
    texts = list(sources.iter_texts(sources.resolve(config, config.data.eval_split), max_chars=5_000_000))
    tokens = sum(len(tokenizer.encode(text)) for text in texts)
    chars = sum(len(text) for text in texts)
    print(f"wrote {output}: {tokenizer.vocab_size} pieces, trained in {seconds:.1f} s; "
          f"{config.data.eval_split}: {chars} characters -> {tokens} tokens ({chars / max(tokens, 1):.2f} chars/token)")


if __name__ == "__main__":
    from absl import flags
    from ml_collections import config_flags

    from lm import cli

    config_flags.DEFINE_config_file("config", None, "Config file (e.g. configs/tiny.py).", lock_config=True)
    flags.DEFINE_string("output", None, "Where to write the .model file; default: the cache path get_or_train uses.")
    flags.DEFINE_integer("max_chars", DEFAULT_MAX_CHARS, "Characters of the train split to train on.")
    flags.mark_flag_as_required("config")
    cli.run(main)
