"""Supervised fine-tuning data: JSON-lines records -> token examples whose loss counts only what the model should say.

`config.data.format` names the records of the files `config.data.files` matches (one JSON object per non-blank line):

- `prompt_completion`: `{"prompt": str, "completion": str}` -> `[BOS] prompt completion [EOS]`, the completion's
  tokens and EOS trained;
- `chat`: `{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}` ending with an assistant
  message -> the conversation rendered by the chat template (`lm.data.chat`: the tokenizer's own, or lm's plain one
  with BOS in front), every assistant turn trained (`chat.assistant_spans`);
- `preference`: `{"prompt", "chosen", "rejected"}`, all strings, or a list of chat messages and two lists ending
  with an assistant message: two examples per record (`lm.data.preference`), checked here like the others.

A token is trained when the character it starts at lies in a trained span (`Tokenizer.encode_with_offsets`), so
the masks follow the text, whatever the tokenizer merges. A record that breaks these rules (not JSON, a missing or
non-string field, an unknown role, an empty completion, a chat that does not end with the assistant, a chosen
completion identical to the rejected one) is a `RecordError` naming the file and line, raised before anything is
compiled.

Splits: a record is in `validation` when `lm.data.text_files.is_validation("FILE:LINE", ...)` says so (the same
5% rule by key hash as documents of local files), else in `train`.

Examples: an example of more than `seq_len + 1` tokens is truncated to its first `seq_len + 1` or dropped
(`config.data.overlong`); one with no trained target left is dropped; both are counted and reported when the split
is tokenized (`Examples.report`), and a split with nothing left is an error, never a stream of all-zero batches.
Rows hold whole examples: `config.data.pack` packs them first-fit (grain's `FirstFitPackIterDataset`), each with its
own segment id and positions from 0, so no example attends to another and a packed batch has the same loss as the
examples one per row; `pack=False` puts each on its own padded row. Each example gives the features of
`lm.data.packing` with `weights` 1 exactly on trained targets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Iterator

import numpy as np
import ml_collections

from lm.data import chat, packing
from lm.data import tokenizer as tokenizer_lib
from lm.data.text_files import files_spec, is_validation
from lm.errors import ChatTemplateError, ConfigError, EmptyDatasetError, RecordError, SplitNotFoundError

SPLITS = ("train", "validation")
# A preference record's precomputed reference log-probabilities of its chosen and rejected sides (TRL's names).
REFERENCE_FIELDS = ("ref_chosen_logps", "ref_rejected_logps")


@dataclasses.dataclass(frozen=True)
class Record:
    key: str  # FILE:LINE, the file relative to the files' common directory.
    fields: dict


@dataclasses.dataclass(frozen=True)
class SftSplit:
    """One split of the fine-tuning records, read and checked (what `lm.data.sources.resolve` gives for
    `config.data.format` other than `text`)."""

    split: str
    format: str
    records: tuple[Record, ...]
    description: str
    fingerprint: str  # Names the files, their sizes and the split: iterator-state checks.

    @property
    def num_documents(self) -> int:
        return len(self.records)


def _check(fields, key: str, data_format: str, reference_log_probs: bool = False) -> None:
    where = f"{key}: a {data_format} record"
    if not isinstance(fields, dict):
        raise RecordError(f"{where} must be a JSON object, got {type(fields).__name__}")
    if data_format == "prompt_completion":
        _check_strings(fields, ("prompt", "completion"), where)
    elif data_format == "chat":
        check_messages(fields.get("messages"), "'messages'", where, ends_with_assistant=True)
    else:
        _check_preference(fields, where)
        if reference_log_probs:
            for name in REFERENCE_FIELDS:
                value = fields.get(name)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise RecordError(f"{where} needs a number {name!r}: config.finetune.dpo.reference="
                                      f"'precomputed' reads the reference's log-probabilities from the records "
                                      f"(python -m lm.reference_log_probs writes them)")


def _check_strings(fields: dict, names: tuple[str, ...], where: str) -> None:
    """String fields `names`, the last (the completion) not empty."""
    for name in names:
        if not isinstance(fields.get(name), str):
            raise RecordError(f"{where} needs a string field {name!r}"
                              + (f" (got {type(fields[name]).__name__})" if name in fields else ""))
    if not fields[names[-1]]:
        raise RecordError(f"{where} has an empty {names[-1]!r}: nothing to train on")


def check_messages(messages, name: str, where: str, ends_with_assistant: bool) -> None:
    """A non-empty list of `{"role", "content"}` messages; `name`: the field, named in errors unless `messages`."""
    of = "" if name == "'messages'" else f" of {name}"
    if not isinstance(messages, list) or not messages:
        raise RecordError(f"{where} needs {name}, a non-empty list of {{'role', 'content'}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in chat.ROLES:
            role = message.get("role") if isinstance(message, dict) else message
            raise RecordError(f"{where}: message {i}{of} has role {role!r}, not one of {', '.join(chat.ROLES)}")
        if not isinstance(message.get("content"), str):
            raise RecordError(f"{where}: message {i}{of} needs a string 'content'")
    if ends_with_assistant and messages[-1]["role"] != "assistant":
        raise RecordError(f"{where}{of} must end with an assistant message, ends with {messages[-1]['role']!r}")


def _check_preference(fields: dict, where: str) -> None:
    """Three strings, or a prompt of messages and chosen / rejected lists of messages ending with the assistant."""
    for name in ("prompt", "chosen", "rejected"):
        if name not in fields:
            raise RecordError(f"{where} needs a field {name!r}")
    if isinstance(fields["prompt"], str):
        _check_strings(fields, ("prompt", "chosen"), where)
        _check_strings(fields, ("prompt", "rejected"), where)
    else:
        check_messages(fields["prompt"], "'prompt'", where, ends_with_assistant=False)
        for name in ("chosen", "rejected"):
            check_messages(fields[name], repr(name), where, ends_with_assistant=True)
    if fields["chosen"] == fields["rejected"]:
        raise RecordError(f"{where} has 'chosen' identical to 'rejected': the pair prefers nothing")


def resolve(config: ml_collections.ConfigDict, split: str) -> SftSplit:
    """Reads and checks the records of `split` (`train` or `validation`) of `config.data.files`."""
    if split not in SPLITS:
        raise SplitNotFoundError(f"split {split!r} of fine-tuning records: one of {', '.join(SPLITS)}")
    spec = files_spec(config)
    data_format = config.data.format
    digest = hashlib.sha256(json.dumps([data_format, split, spec.fingerprint()]).encode())
    records = [record for record in all_records(config, reads_reference_log_probs(config))
               if is_validation(record.key, spec.validation_percent) == (split == "validation")]
    description = f"{data_format} records {config.data.files} ({split})"
    if not records:
        hint = (" (validation holds about 5% of the records, by a hash of FILE:LINE; set config.data.eval_split=train "
                "to evaluate on the training records)") if split == "validation" else ""
        raise EmptyDatasetError(f"split {split!r} of {data_format} records {config.data.files} has no records{hint}")
    return SftSplit(split, data_format, tuple(records), description, digest.hexdigest()[:16])


def reads_reference_log_probs(config: ml_collections.ConfigDict) -> bool:
    """Whether preference records carry their reference log-probabilities (`config.finetune.dpo.reference`)."""
    return (config.data.format == "preference" and config.finetune.objective == "dpo"
            and config.finetune.dpo.reference == "precomputed")


def all_records(config: ml_collections.ConfigDict, reference_log_probs: bool = False) -> Iterator[Record]:
    """Every record of `config.data.files` in file and line order, checked (`reference_log_probs`: also its
    precomputed reference fields); keys are `FILE:LINE` with FILE relative to the files' common directory."""
    spec = files_spec(config)
    for path in spec.files:
        relative = path[len(spec.root):].lstrip("/")
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                key = f"{relative}:{line_no}"
                try:
                    fields = json.loads(line)
                except json.JSONDecodeError as error:
                    raise RecordError(f"{key}: not a JSON object ({error.msg})") from None
                _check(fields, key, config.data.format, reference_log_probs)
                yield Record(key, fields)


def chat_template(config, tokenizer: tokenizer_lib.Tokenizer) -> tuple[str, bool]:
    """`(template, add_bos)`: the configured chat template, and whether lm puts BOS in front (its plain template;
    a model's own template writes its BOS itself)."""
    choice = config.data.chat_template
    if choice == "plain" or (not choice and not tokenizer.chat_template):
        return chat.PLAIN_TEMPLATE, True
    return (choice or tokenizer.chat_template), False


def tokenize(record: Record, data_format: str, tokenizer: tokenizer_lib.Tokenizer, template: str, add_bos: bool,
             trained_turns: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`(tokens, trained)`: int32 and bool `[n]`; `trained[i]`: token i is a target the loss counts. A chat trains
    its last `trained_turns` assistant turns (None: all of them)."""
    if data_format == "prompt_completion":
        text = record.fields["prompt"] + record.fields["completion"]
        spans = [(len(record.fields["prompt"]), len(text))]
    else:
        try:
            text, spans = chat.assistant_spans(template, record.fields["messages"], tokenizer.special_tokens())
        except ChatTemplateError as error:
            raise RecordError(f"{record.key}: {error}") from None
        spans = spans if trained_turns is None else spans[len(spans) - trained_turns:]
    ids, starts = tokenizer.encode_with_offsets(text)
    starts_n = np.asarray(starts, np.int64)
    trained = np.zeros(len(ids), bool)
    for start, end in spans:
        trained |= (starts_n >= start) & (starts_n < end)
    if add_bos and tokenizer.bos_id is not None:
        ids, trained = [tokenizer.bos_id] + ids, np.concatenate([[False], trained])
    if data_format == "prompt_completion":  # The model learns to stop.
        ids, trained = ids + [tokenizer.eos_id], np.concatenate([trained, [True]])
    return np.asarray(ids, np.int32), trained


@dataclasses.dataclass
class Examples:
    """A split's tokenized examples and what happened to the others (module docstring)."""

    examples: list[dict[str, np.ndarray]]  # {"tokens": int32 [n], "trained": int32 [n]}, n <= seq_len + 1.
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_untrained: int = 0
    unit: str = "examples"  # What one of `examples` is (`lm.data.preference`: pairs).

    def report(self, split: SftSplit, seq_len: int) -> str:
        return (f"{split.description}: {len(self.examples)} {self.unit} of {split.num_documents} records; "
                f"{self.truncated} truncated and {self.dropped_overlong} dropped for being longer than seq_len + 1 = "
                f"{seq_len + 1} tokens, {self.dropped_untrained} dropped with nothing to train on after truncation")


def examples(config: ml_collections.ConfigDict, split: SftSplit, tokenizer: tokenizer_lib.Tokenizer) -> Examples:
    """Tokenizes every record of `split`, truncating or dropping as `config.data.overlong` says (module docstring).
    Raises EmptyDatasetError when no example is left."""
    template, add_bos = chat_template(config, tokenizer)
    return fit_examples(config, split, tokenizer, lambda record: {
        "": tokenize(record, split.format, tokenizer, template, add_bos)}, "examples")


def fit_examples(config: ml_collections.ConfigDict, split: SftSplit, tokenizer: tokenizer_lib.Tokenizer,
                 tokenize_record, unit: str, extras=None) -> Examples:
    """The examples of `split`'s records fitted to `seq_len + 1` tokens (module docstring). `tokenize_record(record)`
    gives `{prefix: (tokens, trained)}`, the sequences one record makes, kept, truncated or dropped together; an
    example holds `{prefix}tokens` and `{prefix}trained` (int32) of each, and `extras(record)` (a dict of arrays)
    when given. Raises EmptyDatasetError when no example is left."""
    if tokenizer.eos_id is None:
        raise ConfigError("the tokenizer has no EOS token; fine-tuning examples end with one")
    result = Examples([], unit=unit)
    for record in split.records:
        sequences, counts = fit_sequences(tokenize_record(record), config.data.seq_len + 1, config.data.overlong)
        for count in counts:
            setattr(result, count, getattr(result, count) + 1)
        if sequences is None:
            continue
        example = {f"{prefix}{name}": array for prefix, (tokens, trained) in sequences.items()
                   for name, array in (("tokens", tokens), ("trained", trained.astype(np.int32)))}
        result.examples.append(example if extras is None else {**example, **extras(record)})
    if not result.examples:
        raise EmptyDatasetError(f"{result.report(split, config.data.seq_len)}: no example is left to train on; "
                                f"raise config.data.seq_len or shorten the prompts")
    return result


def fit_sequences(sequences: dict, window: int, overlong: str) -> tuple[dict | None, tuple[str, ...]]:
    """`(sequences, counts)`: one record's `{prefix: (tokens, trained)}` fitted to `window` tokens together, and the
    `Examples` counters it adds to: `truncated`, and (sequences None) `dropped_overlong` (with `overlong` drop) or
    `dropped_untrained` (no trained target left, after truncation or not)."""
    counts = ()
    if any(len(tokens) > window for tokens, _ in sequences.values()):
        if overlong == "drop":
            return None, ("dropped_overlong",)
        sequences = {prefix: (tokens[:window], trained[:window]) for prefix, (tokens, trained) in sequences.items()}
        counts = ("truncated",)
    if not all(trained[1:].any() for _, trained in sequences.values()):  # The first token is never a target.
        return None, (*counts, "dropped_untrained")
    return sequences, counts


def to_example(row, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One row of `seq_len + 1` tokens from the packer (`tokens`, `trained` and their segment ids and positions),
    or one example alone (padded here), -> the features of `lm.data.packing`, weights only on trained targets."""
    if "tokens_segment_ids" not in row:
        n = len(row["tokens"])
        padded = lambda a, fill: np.concatenate([a, np.full(seq_len + 1 - n, fill, a.dtype)])
        segment_ids_w = padded(np.ones(n, np.int32), 0)
        row = {"tokens": padded(row["tokens"], pad_id), "trained": padded(row["trained"], 0),
               "tokens_segment_ids": segment_ids_w, "tokens_positions": padded(np.arange(n, dtype=np.int32), 0)}
    example = packing.window_to_example(row["tokens"], row["tokens_segment_ids"], row["tokens_positions"])
    example["weights"] = example["weights"] * row["trained"][1:].astype(np.float32)
    return example
