"""One tokenizer interface for SentencePiece models and Hugging Face `tokenizer.json` files.

`Tokenizer` is what the data pipeline, evaluation and generation use: `encode` (text -> ids, no special tokens),
`decode`, `vocab_size`, the special ids `bos_id` / `eos_id` / `pad_id` (None when the tokenizer has none),
`token_bytes` and `prefix_bytes` (what bits per byte divides by), `fingerprint`, `chat_template` and `save`. Two
implementations:

- `SentencePieceTokenizer`: a `.model` file (the tokenizers lm trains, `lm.data.tokenizer_training`);
- `HuggingFaceTokenizer`: a fast tokenizer's `tokenizer.json` (read by the `tokenizers` library) with the special
  tokens and chat template of its `tokenizer_config.json`, as Hugging Face checkpoints ship them.

A run keeps its own tokenizer in its workdir (`tokenizer.model`, or `tokenizer.json` with `tokenizer_config.json`
for an imported model); programs that read a run (`lm.evaluate`, `lm.generate`) load that copy with
`from_workdir` and never make a new one.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import json
import re
from collections.abc import Sequence

from etils import epath
import ml_collections
import numpy as np
import sentencepiece as spm

from lm import paths
from lm.errors import CheckpointError, ConfigError

SENTENCEPIECE_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"


class Tokenizer(abc.ABC):
    """What lm asks of a tokenizer (module docstring)."""

    vocab_size: int  # Number of ids the tokenizer produces (the model's vocabulary may be larger).
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    chat_template: str | None = None  # A Jinja template of the model's chat format, when its files carry one.

    @abc.abstractmethod
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of `text`. By default without BOS/EOS (callers add those where a document needs them);
        `add_special_tokens=True` adds what the tokenizer itself adds to a text: a `tokenizer.json`'s post-processor
        (Llama's BOS, none for GPT-2), as transformers' `tokenizer.encode(text)` does; BOS for a SentencePiece model,
        as lm's training documents start."""

    @abc.abstractmethod
    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """`(ids, starts)`: the ids of `text` without added special tokens, where the text of a special token (the
        BOS / EOS strings a chat template writes) is that token, and the index in `text` of the character where each
        token starts: what tells a fine-tuning example which tokens a span of characters produced (`lm.data.sft`)."""

    @abc.abstractmethod
    def special_tokens(self) -> dict[str, str]:
        """The special tokens' strings by name (`bos_token`, `eos_token`, ...), as chat templates read them."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`; special tokens are dropped, and so are ids at or above `vocab_size` (a model's padded
        vocabulary has ids no text stands for, which an undertrained model can still sample)."""

    @abc.abstractmethod
    def token_byte_strings(self, vocab_size: int) -> list[bytes]:
        """The UTF-8 bytes of the text each id below `vocab_size` stands for (empty for special and padded ids), so a
        text's bytes are its tokens' joined (less `prefix_bytes` at the start); stop strings are matched on them."""

    def token_bytes(self, vocab_size: int) -> np.ndarray:
        """int64 `[vocab_size]`: how many bytes of text each id stands for (`token_byte_strings`), so the bytes of a
        document's text are the sum over its tokens."""
        return np.array([len(piece) for piece in self.token_byte_strings(vocab_size)], np.int64)

    def prefix_bytes(self) -> int:
        """Bytes a text's first token stands for that are not in the text: 1 for SentencePiece-style tokenizers
        that put "▁" (a space) in front of every text they encode and drop it again when decoding (Llama 2,
        Mistral), else 0. So the bytes of a document are `token_bytes` summed over its tokens less this."""
        ids = self.encode("a")
        return int(self.token_bytes(self.vocab_size)[ids].sum()) - len(self.decode(ids).encode("utf-8"))

    @abc.abstractmethod
    def _files(self) -> dict[str, bytes]:
        """The files that define this tokenizer, by workdir file name."""

    def fingerprint(self) -> str:
        """12 hex digits identifying the tokenizer (its files)."""
        digest = hashlib.sha256()
        for name, data in sorted(self._files().items()):
            digest.update(name.encode() + b"\0" + data)
        return digest.hexdigest()[:12]

    def save(self, workdir: str) -> None:
        """Writes the tokenizer's files into `workdir`, each atomically."""
        for name, data in self._files().items():
            path = paths.resolve(workdir, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            paths.write_atomic(path, data)


def _special(token_id: int) -> int | None:
    return token_id if token_id >= 0 else None


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (`processor` is the `sentencepiece.SentencePieceProcessor`)."""

    def __init__(self, processor: spm.SentencePieceProcessor):
        self.processor = processor
        self.vocab_size = processor.vocab_size()
        self.bos_id, self.eos_id = _special(processor.bos_id()), _special(processor.eos_id())
        self.pad_id = _special(processor.pad_id())

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        bos = [self.bos_id] if add_special_tokens and self.bos_id is not None else []
        return bos + self.processor.encode(text)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        # SentencePiece reads "</s>" as text; the chunks between special-token strings are encoded on their own.
        specials = {piece: i for name, piece in self.special_tokens().items()
                    for i in [self.processor.piece_to_id(piece)]}
        ids, starts, position = [], [], 0
        pattern = "(" + "|".join(re.escape(piece) for piece in specials) + ")" if specials else None
        for chunk in (re.split(pattern, text) if pattern else [text]):
            if chunk in specials:
                ids.append(specials[chunk])
                starts.append(position)
            elif chunk:
                char_of_byte = np.repeat(np.arange(len(chunk)), [len(c.encode("utf-8")) for c in chunk])
                char_of_byte = np.append(char_of_byte, len(chunk))
                for piece in self.processor.encode(chunk, out_type="proto").pieces:
                    ids.append(piece.id)
                    starts.append(position + int(char_of_byte[piece.begin]))
            position += len(chunk)
        return ids, starts

    def special_tokens(self) -> dict[str, str]:
        names = {"bos_token": self.bos_id, "eos_token": self.eos_id, "pad_token": self.pad_id}
        return {name: self.processor.id_to_piece(i) for name, i in names.items() if i is not None}

    def decode(self, ids: Sequence[int]) -> str:
        return self.processor.decode([i for i in ids if i < self.vocab_size])

    def token_byte_strings(self, vocab_size: int) -> list[bytes]:
        # The tokenizers lm trains are lossless (`lm.data.tokenizer_training`): a piece's bytes are exactly those of
        # the raw text it encodes. Byte-fallback pieces (<0x0A>) are that byte; others are text with "▁" for a space.
        p = self.processor
        pieces = [b""] * vocab_size
        for i in range(min(p.get_piece_size(), vocab_size)):
            if p.is_byte(i):
                pieces[i] = bytes([int(p.id_to_piece(i)[3:5], 16)])
            elif not (p.is_control(i) or p.is_unknown(i)):
                pieces[i] = p.id_to_piece(i).replace("▁", " ").encode("utf-8")
        return pieces

    def _files(self) -> dict[str, bytes]:
        return {SENTENCEPIECE_FILE: self.processor.serialized_model_proto()}


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte, inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


class HuggingFaceTokenizer(Tokenizer):
    """A fast tokenizer: `tokenizer.json` text and the `tokenizer_config.json` text (special tokens, chat
    template); `what` names where they came from in errors."""

    def __init__(self, tokenizer_json: str, tokenizer_config_json: str | None, what: str):
        from tokenizers import Tokenizer as FastTokenizer

        try:
            self.tokenizer = FastTokenizer.from_str(tokenizer_json)
        except Exception as error:  # The Rust parser's error: not a tokenizer file.
            raise ConfigError(f"{what} is not a Hugging Face tokenizer.json ({' '.join(str(error).split())[:120]})"
                              ) from None
        self._json, self._config_json = tokenizer_json, tokenizer_config_json
        settings = json.loads(tokenizer_config_json) if tokenizer_config_json else {}
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.pad_id = (self._token_id(settings.get(f"{name}_token"), what)
                                                 for name in ("bos", "eos", "pad"))
        self.chat_template = settings.get("chat_template")
        self._special_tokens = {}
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            token = settings.get(name)
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str):
                self._special_tokens[name] = token
        self._byte_level = '"ByteLevel"' in json.dumps(json.loads(tokenizer_json).get("decoder"))

    def _token_id(self, token, what: str) -> int | None:
        if isinstance(token, dict):  # {"content": "<s>", ...} in older files.
            token = token.get("content")
        if token is None:
            return None
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ConfigError(f"{what}: special token {token!r} is not in the vocabulary")
        return token_id

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        return encoding.ids, [start for start, _ in encoding.offsets]

    def special_tokens(self) -> dict[str, str]:
        return dict(self._special_tokens)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i < self.vocab_size], skip_special_tokens=True)

    def token_byte_strings(self, vocab_size: int) -> list[bytes]:
        pieces = [b""] * vocab_size
        special = {token.content for token in self.tokenizer.get_added_tokens_decoder().values() if token.special}
        decoder = _byte_decoder()
        for token, i in self.tokenizer.get_vocab(with_added_tokens=True).items():
            if token in special or i >= vocab_size:
                continue
            if self._byte_level and all(c in decoder for c in token):  # Every character stands for one byte.
                pieces[i] = bytes(decoder[c] for c in token)
            elif self._byte_level:  # An added token, kept as its text.
                pieces[i] = token.encode("utf-8")
            elif token.startswith("<0x") and token.endswith(">") and len(token) == 6:  # Byte fallback.
                pieces[i] = bytes([int(token[3:5], 16)])
            else:  # SentencePiece-style pieces: "▁" stands for a space.
                pieces[i] = token.replace("▁", " ").encode("utf-8")
        return pieces

    def _files(self) -> dict[str, bytes]:
        files = {HF_FILE: self._json.encode()}
        if self._config_json is not None:
            files[HF_CONFIG_FILE] = self._config_json.encode()
        return files


def _parse_sentencepiece(model_proto: bytes, what: str, error: type[Exception]) -> SentencePieceTokenizer:
    try:
        return SentencePieceTokenizer(spm.SentencePieceProcessor(model_proto=model_proto))
    except RuntimeError:  # sentencepiece's parse failure
        raise error(f"{what} is not a SentencePiece model ({len(model_proto)} bytes that do not parse)") from None


def load(path: str, what: str = "config.data.tokenizer.path") -> Tokenizer:
    """A tokenizer from `path` (local or in a bucket): a SentencePiece `.model` file, a `tokenizer.json` (with the
    `tokenizer_config.json` beside it, if any), or a directory holding either; `what` names where the path came
    from."""
    path_ = epath.Path(path)
    if path_.is_dir():
        for name in (HF_FILE, SENTENCEPIECE_FILE):
            if (path_ / name).is_file():
                return load(str(path_ / name), what)
        raise ConfigError(f"{what}={path!r}: the directory has neither {HF_FILE} nor {SENTENCEPIECE_FILE}")
    if not path_.is_file():
        raise ConfigError(f"{what}={path!r}: no such tokenizer file (a SentencePiece .model or a tokenizer.json)")
    if path_.suffix == ".json":
        config_path = path_.parent / HF_CONFIG_FILE
        return HuggingFaceTokenizer(path_.read_text(), config_path.read_text() if config_path.is_file() else None,
                                    f"{what}={path!r}")
    return _parse_sentencepiece(path_.read_bytes(), f"{what}={path!r}", ConfigError)


def in_workdir(workdir: str) -> bool:
    """Whether `workdir` holds a tokenizer (`from_workdir` would find one)."""
    return any(paths.resolve(workdir, name).is_file() for name in (HF_FILE, SENTENCEPIECE_FILE))


def from_workdir(workdir: str) -> Tokenizer:
    """The tokenizer of the run in `workdir`: its `tokenizer.json` (imported models) or `tokenizer.model`."""
    hf_path = paths.resolve(workdir, HF_FILE)
    if hf_path.is_file():
        config_path = paths.resolve(workdir, HF_CONFIG_FILE)
        return HuggingFaceTokenizer(hf_path.read_text(), config_path.read_text() if config_path.is_file() else None,
                                    str(hf_path))
    path = paths.resolve(workdir, SENTENCEPIECE_FILE)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: the run's tokenizer is missing (lm.train copies it there)")
    return _parse_sentencepiece(path.read_bytes(), str(path), CheckpointError)


def padded_vocab_size(vocab_size: int, multiple: int = 128) -> int:
    """`vocab_size` rounded up to a multiple of `multiple` (embedding and LM-head widths that tile well)."""
    return -(-vocab_size // multiple) * multiple


def check_vocab_size(tokenizer: Tokenizer | int, config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError when the tokenizer has more ids than `config.model.vocab_size` embeddings.

    A model vocabulary larger than the tokenizer's is fine (e.g. padded with `padded_vocab_size`): the extra rows
    are never looked up and their logits are trained towards -inf.
    """
    size = tokenizer if isinstance(tokenizer, int) else tokenizer.vocab_size
    if size > config.model.vocab_size:
        raise ConfigError(
            f"the tokenizer has {size} pieces but config.model.vocab_size={config.model.vocab_size}; set "
            f"config.model.vocab_size >= {size} (e.g. {padded_vocab_size(size)}, a multiple of 128)")
