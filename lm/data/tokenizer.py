"""SentencePiece tokenizers: load a `.model` file, or train one on the configured source and cache it.

`get_tokenizer(config, workdir=...)` is what the entry points call. It returns a `sentencepiece.SentencePieceProcessor`
(`encode`, `decode`, `vocab_size()`, `bos_id()`, `eos_id()`, `pad_id()`, `serialized_model_proto()`), found in order:
1. `workdir/tokenizer.model`, if the run already has one (a resumed run, `lm.evaluate`, `lm.generate`);
2. `config.data.tokenizer.path`, a SentencePiece `.model` file;
3. the cache: `<cache>/tokenizers/<source>-v<vocab>-<hash>.model`, where the hash covers the source's documents
   (its fingerprint) and every training setting; trained there on first use (see `train`).
With a workdir, the model used is copied to `workdir/tokenizer.model`, so the run keeps its own tokenizer.

Training (`train`, or `python -m lm.data.tokenizer --config=configs/tiny.py --output=PATH`) reads the train split in
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
import json
import os
import re
from collections.abc import Iterable, Iterator

from etils import epath
import ml_collections
import sentencepiece as spm

from lm import paths
from lm.config import ConfigError
from lm.data import sources

DEFAULT_MAX_CHARS = 20_000_000
WORKDIR_FILENAME = "tokenizer.model"
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


def padded_vocab_size(vocab_size: int, multiple: int = 128) -> int:
    """`vocab_size` rounded up to a multiple of `multiple` (embedding and LM-head widths that tile well)."""
    return -(-vocab_size // multiple) * multiple


def check_vocab_size(tokenizer: spm.SentencePieceProcessor | int, config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError when the tokenizer has more pieces than `config.model.vocab_size` embeddings.

    A model vocabulary larger than the tokenizer's is fine (e.g. padded with `padded_vocab_size`): the extra rows
    are never looked up and their logits are trained towards -inf.
    """
    size = tokenizer if isinstance(tokenizer, int) else tokenizer.vocab_size()
    if size > config.model.vocab_size:
        raise ConfigError(
            f"the tokenizer has {size} pieces but config.model.vocab_size={config.model.vocab_size}; set "
            f"config.model.vocab_size >= {size} (e.g. {padded_vocab_size(size)}, a multiple of 128)")


def load(path: str) -> spm.SentencePieceProcessor:
    """Loads a SentencePiece `.model` file (local or in a bucket)."""
    if not epath.Path(path).is_file():
        raise FileNotFoundError(f"SentencePiece model {path!r} (config.data.tokenizer.path) does not exist")
    return spm.SentencePieceProcessor(model_proto=epath.Path(path).read_bytes())


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


def train(config: ml_collections.ConfigDict, output: str, *, max_chars: int = DEFAULT_MAX_CHARS
          ) -> spm.SentencePieceProcessor:
    """Trains a SentencePiece model on the train split of the configured source and writes it to `output`."""
    t = config.data.tokenizer
    if t.eos_id < 0:
        raise ConfigError("config.data.tokenizer.eos_id must be >= 0: documents are EOS-terminated")
    resolved = sources.resolve(config, config.data.train_split)
    settings = training_settings(config, max_chars)
    del settings["max_chars"], settings["sentencepiece"]
    # Sentences are fed from an iterator, so the corpus is never written out as a text file.
    model = _train_from_texts(paragraphs(sources.iter_texts(resolved, max_chars=max_chars)), settings)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    # Write-then-rename, so processes that train the same model at once never read a partial file.
    paths.write_atomic(paths.resolve(output), model)
    return spm.SentencePieceProcessor(model_proto=model)


def _train_from_texts(sentences: Iterable[str], settings: dict) -> bytes:
    import io

    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=writer, **settings)
    except RuntimeError as e:
        raise ConfigError(f"SentencePiece training with config.data.tokenizer={settings} failed: {e}") from None
    return writer.getvalue()


def cached_path(config: ml_collections.ConfigDict, max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """Where the tokenizer trained for this config's source and settings is cached (whether or not it exists)."""
    resolved = sources.resolve(config, config.data.train_split)
    key = json.dumps([resolved.fingerprint, training_settings(config, max_chars)], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", config.data.name if config.data.source == "tfds" else config.data.source)
    return os.path.join(sources.cache_root(config), "tokenizers",
                        f"{slug}-v{config.data.tokenizer.vocab_size}-{digest}.model")


def get_tokenizer(config: ml_collections.ConfigDict, *, workdir: str | None = None) -> spm.SentencePieceProcessor:
    """The run's tokenizer: workdir copy, else `config.data.tokenizer.path`, else cached/trained (module docstring).

    Checks `config.model.vocab_size` against it (`check_vocab_size`).
    """
    if config.data.source == "synthetic":
        raise ConfigError("config.data.source='synthetic' uses no tokenizer")
    in_workdir = paths.resolve(workdir, WORKDIR_FILENAME) if workdir else None
    if in_workdir and in_workdir.is_file():
        path = str(in_workdir)
    elif config.data.tokenizer.path:
        path = config.data.tokenizer.path
    else:
        path = cached_path(config)
        if not os.path.isfile(path):
            train(config, path)
    tokenizer = load(path)
    check_vocab_size(tokenizer, config)
    if in_workdir and path != str(in_workdir):
        in_workdir.parent.mkdir(parents=True, exist_ok=True)
        paths.write_atomic(in_workdir, tokenizer.serialized_model_proto())
    return tokenizer


def fingerprint(tokenizer: spm.SentencePieceProcessor) -> str:
    """12 hex digits identifying a tokenizer model (its serialized proto)."""
    return hashlib.sha256(tokenizer.serialized_model_proto()).hexdigest()[:12]


def main(argv):
    """`python -m lm.data.tokenizer --config=configs/tiny.py --output=PATH`: train and report compression."""
    import time

    from absl import flags

    from lm import config as lm_config

    del argv
    config = lm_config.validate(flags.FLAGS.config)
    output = flags.FLAGS.output or cached_path(config, flags.FLAGS.max_chars)
    start = time.perf_counter()
    tokenizer = train(config, output, max_chars=flags.FLAGS.max_chars)
    seconds = time.perf_counter() - start
    check_vocab_size(tokenizer, config)
    texts = list(sources.iter_texts(sources.resolve(config, config.data.eval_split), max_chars=5_000_000))
    tokens = sum(len(ids) for ids in tokenizer.encode(texts))
    chars = sum(len(text) for text in texts)
    print(f"wrote {output}: {tokenizer.vocab_size()} pieces, trained in {seconds:.1f} s; "
          f"{config.data.eval_split}: {chars} characters -> {tokens} tokens ({chars / max(tokens, 1):.2f} chars/token)")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Config file (e.g. configs/tiny.py).", lock_config=True)
    flags.DEFINE_string("output", None, "Where to write the .model file; default: the cache path get_tokenizer uses.")
    flags.DEFINE_integer("max_chars", DEFAULT_MAX_CHARS, "Characters of the train split to train on.")
    flags.mark_flag_as_required("config")
    app.run(main)
