"""The errors lm raises for bad input: one base class, so a program prints any of them as one line (`lm.cli`).

Every message is one line that names the field, file, flag or argument at fault and says what was expected. They
derive from `ValueError` (bad values), so code that caught `ValueError` keeps working. Modules re-export the classes
they raise (`lm.config.ConfigError`, `lm.checkpoint.CheckpointError`, `lm.data.sources.DataError`, ...).

    LmError
    ├── ConfigError          a config field holds a value lm cannot run with
    ├── ArgumentError        a function argument or command-line flag does (lm.generate, lm.preflight)
    ├── DistributedError     the multi-process settings contradict each other
    ├── CheckpointError      a workdir or its checkpoints cannot be used as asked
    ├── IteratorStateError   a saved data-iterator state belongs to another data stream
    ├── NonFiniteError       training diverged: too many non-finite steps in a row
    ├── MissingExtraError    an optional feature's package is not installed (the message names the extra)
    └── DataError            the configured data cannot be read
        ├── DatasetNotFoundError, SplitNotFoundError, FilesNotFoundError
        └── EmptyDatasetError, TextFieldError
"""

from __future__ import annotations


class LmError(ValueError):
    """Base of every error lm raises for bad input; the message is one line."""


class ConfigError(LmError):
    """A config field holds a value the program cannot run with. The message names the field."""


class ArgumentError(LmError):
    """A function argument or command-line flag holds a value lm cannot use. The message names it."""


class DistributedError(LmError):
    """The multi-process settings contradict each other. The message names the flag."""


class CheckpointError(LmError):
    """The workdir or its checkpoints cannot be used as asked; the message says which and why."""


class IteratorStateError(LmError):
    """A saved iterator state does not belong to this pipeline (it was saved under a different config)."""


class NonFiniteError(LmError):
    """Too many consecutive steps had a non-finite loss or gradient; the message names the last good checkpoint."""


class MissingExtraError(LmError):
    """An optional feature needs a package that is not installed; the message names the extra that brings it."""


class DataError(LmError):
    """The configured data cannot be read. The message names the field, file or split, and what was expected."""


class DatasetNotFoundError(DataError):
    """No TFDS dataset of the configured name, or it is not prepared in `data_dir`."""


class SplitNotFoundError(DataError):
    """The configured split is not one of the dataset's splits."""


class FilesNotFoundError(DataError):
    """The configured files glob matches nothing."""


class EmptyDatasetError(DataError):
    """A split (or one process's shard of it) has no documents."""


class TextFieldError(DataError):
    """The configured text field is not a feature of the dataset, or a JSON-lines record lacks it."""


class RecordError(DataError):
    """A fine-tuning record does not follow `config.data.format` (the message names the file and line)."""


class ChatTemplateError(DataError):
    """A chat template does not parse, raised (its own `raise_exception`), or renders turns inconsistently."""
