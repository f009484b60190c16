"""Local text files as documents: what a document is, its key, and which split it belongs to (pure Python).

`lm.data.sources` reads them through the TFDS builder in `lm.data.text_files_builder`, which imports
`tensorflow_datasets`; this module imports neither, so both can import it.

The default corpus
------------------
The pure-Python top-level modules of the standard library: every `*.py` file directly in
`sysconfig.get_paths()['stdlib']` whose module name is in `sys.stdlib_module_names`, one document per file (source
code with its docstrings and comments), sorted by file name. The names filter drops what distributions add there
(`_sysconfigdata_*`, `sitecustomize`, `__hello__`). It needs no download and exists wherever CPython's standard
library is installed as source (CPython installers, distributions' python3, venvs, conda, the python Docker images);
an installation shipping only compiled modules gets an `EmptyDatasetError` saying so.
The content is fixed for a given CPython version and differs between versions (3.11+, where
`sys.stdlib_module_names` exists); on CPython 3.11.7: 166 files, 4,661,210 characters, 1,523,943 tokens with the
default tokenizer (BPE, 2048 pieces; 3.06 characters per token; BOS/EOS not counted).
Split: a file is in `validation` when `split_hash(file name) % 100 < 10`, else in `train`. On 3.11.7 that is 17 files
(_py_abc, _threading_local, compileall, crypt, doctest, fnmatch, getpass, hmac, imp, modulefinder, operator, pprint,
statistics, struct, sunau, turtle, warnings: 465,080 characters, 158,520 tokens) against 149 in `train` (4,196,130
characters, 1,365,423 tokens). For user files the validation share is 5%, by the hash of the document key
(`TextFilesSpec`).
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import json
import os
import sys
import sysconfig
import zlib
from collections.abc import Iterator

import ml_collections

from lm.errors import ConfigError, DataError, EmptyDatasetError, FilesNotFoundError, TextFieldError

TEXT_FILES_VERSION = "1.0.0"
DEFAULT_CORPUS_VALIDATION_PERCENT = 10
FILES_VALIDATION_PERCENT = 5
_JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")


def split_hash(key: str) -> int:
    """A stable 64-bit hash of a document key (the first 8 bytes of its SHA-256, big-endian)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")


def is_validation(key: str, validation_percent: int) -> bool:
    """Whether the document with this key belongs to the `validation` split: `split_hash(key) % 100 < percent`."""
    return split_hash(key) % 100 < validation_percent


@dataclasses.dataclass(frozen=True)
class TextFilesSpec:
    """The files of an `lm_text_files` dataset and how they are read.

    Documents:
    - `*.jsonl`, `*.json`, `*.jsonl.gz`, `*.json.gz`: JSON lines, one document per non-blank line, its text in
      `text_field` (a missing field or a non-string value is an error naming file, line and field);
    - any other file (`*.txt`, `*.md`, `*.py`, `*.txt.gz`, ...): the whole file, UTF-8, is one document.
    Each document has a key: the file's path relative to `root`, plus `:LINE` (1-based) for JSON lines. Keys do not
    change when the directory moves, so neither does the split (`is_validation(key, validation_percent)`).

    Attributes:
      files: absolute paths, sorted.
      root: the directory keys are relative to.
      text_field: JSON field holding the text of JSON-lines documents.
      validation_percent: share (by key hash) of documents in `validation`, 0..100.
      hash_contents: fingerprint file contents (small fixed corpora) rather than sizes and mtimes (user files).
    """

    files: tuple[str, ...]
    root: str
    text_field: str = "text"
    validation_percent: int = FILES_VALIDATION_PERCENT
    hash_contents: bool = False

    def fingerprint(self) -> str:
        """16 hex digits naming the documents this spec produces (the TFDS builder config name)."""
        h = hashlib.sha256(json.dumps([TEXT_FILES_VERSION, self.text_field, self.validation_percent]).encode())
        for path in self.files:
            h.update(os.path.relpath(path, self.root).encode() + b"\0")
            if self.hash_contents:
                with open(path, "rb") as f:
                    h.update(hashlib.sha256(f.read()).digest())
            else:
                st = os.stat(path)
                h.update(f"{st.st_size}:{st.st_mtime_ns};".encode())
        return h.hexdigest()[:16]


def _open_text(path: str):
    # newline="" keeps "\r\n" as it is, so documents are reproduced exactly.
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def read_documents(spec: TextFilesSpec) -> Iterator[tuple[str, str]]:
    """Yields `(key, text)` for every document of every file of `spec`, in file order."""
    for path in spec.files:
        rel = os.path.relpath(path, spec.root)
        try:
            if not path.endswith(_JSON_SUFFIXES):
                with _open_text(path) as f:
                    yield rel, f.read()
                continue
            with _open_text(path) as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
                    if not isinstance(record, dict) or spec.text_field not in record:
                        found = sorted(record) if isinstance(record, dict) else type(record).__name__
                        raise TextFieldError(
                            f"{path}:{line_no}: no text field {spec.text_field!r} (config.data.text_field); "
                            f"the record has {found}")
                    text = record[spec.text_field]
                    if not isinstance(text, str):
                        raise TextFieldError(
                            f"{path}:{line_no}: config.data.text_field={spec.text_field!r} holds a "
                            f"{type(text).__name__}, expected a string")
                    yield f"{rel}:{line_no}", text
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except (EOFError, OSError, zlib.error) as e:  # A truncated or corrupt .gz, an unreadable file.
            raise DataError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None


def document_keys(spec: TextFilesSpec) -> Iterator[str]:
    """The keys `read_documents` yields, found without decoding the documents (JSON lines are not parsed)."""
    for path in spec.files:
        rel = os.path.relpath(path, spec.root)
        if not path.endswith(_JSON_SUFFIXES):
            yield rel
            continue
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    yield f"{rel}:{line_no}"


def default_corpus_spec() -> TextFilesSpec:
    """The built-in corpus: the standard library's pure-Python top-level modules (see the module docstring)."""
    stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
    names = set(sys.stdlib_module_names)
    files = sorted(os.path.join(stdlib, f) for f in os.listdir(stdlib) if f.endswith(".py") and f[:-3] in names)
    if not files:
        raise EmptyDatasetError(
            f"config.data.source='default': no standard-library sources (*.py) under {stdlib}; this Python "
            f"installation ships compiled modules only, use source='files' or 'tfds'")
    return TextFilesSpec(files=tuple(files), root=stdlib, validation_percent=DEFAULT_CORPUS_VALIDATION_PERCENT,
                         hash_contents=True)


def files_spec(config: ml_collections.ConfigDict) -> TextFilesSpec:
    """The files matching `config.data.files` (comma-separated globs; `**` matches directories recursively)."""
    pattern = config.data.files
    if not pattern:
        raise ConfigError("config.data.source='files' needs config.data.files, a glob of .txt/.jsonl files")
    files = set()
    for part in (p.strip() for p in pattern.split(",")):
        files.update(os.path.abspath(f) for f in glob.glob(os.path.expanduser(part), recursive=True)
                     if os.path.isfile(f))
    if not files:
        raise FilesNotFoundError(f"config.data.files={pattern!r} matches no files")
    files = tuple(sorted(files))
    root = os.path.commonpath([os.path.dirname(f) for f in files])
    return TextFilesSpec(files=files, root=root, text_field=config.data.text_field)
