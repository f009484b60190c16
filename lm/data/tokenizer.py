"""Loading and reading a SentencePiece tokenizer: what evaluation, sampling and the data pipeline need.

A run keeps its own tokenizer in `workdir/tokenizer.model` (`from_workdir`); programs that read a trained run
(`lm.evaluate`, `lm.generate`) load that copy and never make a new one. Training a tokenizer (which needs the data
sources) is `lm.data.tokenizer_training`'s job.

A tokenizer is a `sentencepiece.SentencePieceProcessor`: `encode`, `decode`, `vocab_size()`, `bos_id()`, `eos_id()`,
`pad_id()`, `serialized_model_proto()`.
"""

from __future__ import annotations

import hashlib

from etils import epath
import ml_collections
import numpy as np
import sentencepiece as spm

from lm import paths
from lm.errors import CheckpointError, ConfigError

WORKDIR_FILENAME = "tokenizer.model"


def load(path: str, what: str = "config.data.tokenizer.path") -> spm.SentencePieceProcessor:
    """Loads a SentencePiece `.model` file (local or in a bucket); `what` names where the path came from."""
    if not epath.Path(path).is_file():
        raise ConfigError(f"{what}={path!r}: no such SentencePiece model file")
    return _parse(epath.Path(path).read_bytes(), f"{what}={path!r}", ConfigError)


def _parse(model_proto: bytes, what: str, error: type[Exception]) -> spm.SentencePieceProcessor:
    try:
        return spm.SentencePieceProcessor(model_proto=model_proto)
    except RuntimeError:  # sentencepiece's parse failure
        raise error(f"{what} is not a SentencePiece model ({len(model_proto)} bytes that do not parse)") from None


def workdir_path(workdir: str) -> epath.Path:
    return paths.resolve(workdir, WORKDIR_FILENAME)


def from_workdir(workdir: str) -> spm.SentencePieceProcessor:
    """The tokenizer a run in `workdir` trained with (`workdir/tokenizer.model`)."""
    path = workdir_path(workdir)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: the run's tokenizer is missing (lm.train copies it there)")
    return _parse(path.read_bytes(), str(path), CheckpointError)


def save_to_workdir(tokenizer: spm.SentencePieceProcessor, workdir: str) -> None:
    """Writes `workdir/tokenizer.model` atomically."""
    path = workdir_path(workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    paths.write_atomic(path, tokenizer.serialized_model_proto())


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


def fingerprint(tokenizer: spm.SentencePieceProcessor) -> str:
    """12 hex digits identifying a tokenizer model (its serialized proto)."""
    return hashlib.sha256(tokenizer.serialized_model_proto()).hexdigest()[:12]


def piece_bytes(tokenizer: spm.SentencePieceProcessor, vocab_size: int) -> np.ndarray:
    """int64 `[vocab_size]`: UTF-8 bytes of the text each token id stands for (0 for control and padded ids).

    The tokenizers lm trains are lossless (`lm.data.tokenizer_training`), so the bytes of a piece are exactly the
    bytes of the raw text it encodes: what bits per byte divides by.
    """
    table = np.zeros(vocab_size, np.int64)
    for i in range(tokenizer.get_piece_size()):
        if tokenizer.is_control(i) or tokenizer.is_unknown(i):
            continue
        # Byte-fallback pieces (<0x0A>) are one byte; others are text with "▁" standing for a space.
        table[i] = 1 if tokenizer.is_byte(i) else len(tokenizer.id_to_piece(i).replace("▁", " ").encode("utf-8"))
    return table
