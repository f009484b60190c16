"""Preference data: JSON-lines pairs `{"prompt", "chosen", "rejected"}` -> a chosen and a rejected example of the
same prompt, for DPO and reward models.

Records (`config.data.format = "preference"`, checked by `lm.data.sft` like the other fine-tuning records, one
line naming FILE:LINE for a missing field, a wrong type, an empty completion or `chosen` identical to `rejected`):

- strings: each side is the prompt/completion example `[BOS] prompt completion [EOS]`, the completion and EOS trained;
- chat: `prompt` a list of messages, `chosen` and `rejected` lists of messages ending with an assistant message (as
  TRL's conversational format has them); each side is the conversation `prompt + side` rendered by the chat
  template, only the side's assistant turns trained (not earlier assistant turns of the prompt).

A pair is kept, truncated or dropped whole (`config.data.overlong`; `lm.data.sft.fit_examples` counts them).

With `config.finetune.dpo.reference = "precomputed"` a record also carries `ref_chosen_logps` and
`ref_rejected_logps` (TRL's columns: the reference's summed log-probabilities of each side, as
`python -m lm.reference_log_probs` writes them), and batches carry them as `reference_log_probs`.

Rows: one sequence per row, padded (so each row's trained log-probabilities sum to one sequence's), the chosen side
of pair i in row `2 i` of a batch and its rejected side in row `2 i + 1`; `config.data.batch_size` counts rows, so
it is even. A stream's last batch is filled with padding pairs (weights 0 on both rows).
"""

from __future__ import annotations

import numpy as np
import ml_collections

from lm.data import REFERENCE_FEATURE, packing, sft
from lm.data import tokenizer as tokenizer_lib

SIDES = ("chosen", "rejected")


def tokenize(record: sft.Record, tokenizer: tokenizer_lib.Tokenizer, template: str, add_bos: bool
             ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`{"chosen_": (tokens, trained), "rejected_": (tokens, trained)}` of one record (`lm.data.sft.tokenize`)."""
    prompt = record.fields["prompt"]
    sides = {}
    for side in SIDES:
        completion = record.fields[side]
        if isinstance(prompt, str):
            example = sft.Record(record.key, {"prompt": prompt, "completion": completion})
            sides[f"{side}_"] = sft.tokenize(example, "prompt_completion", tokenizer, template, add_bos)
        else:
            example = sft.Record(record.key, {"messages": prompt + completion})
            turns = sum(message["role"] == "assistant" for message in completion)
            sides[f"{side}_"] = sft.tokenize(example, "chat", tokenizer, template, add_bos, trained_turns=turns)
    return sides


def examples(config: ml_collections.ConfigDict, split: sft.SftSplit, tokenizer: tokenizer_lib.Tokenizer
             ) -> sft.Examples:
    """The pairs of `split`: examples `{chosen_tokens, chosen_trained, rejected_tokens, rejected_trained}`."""
    template, add_bos = sft.chat_template(config, tokenizer)
    extras = None
    if sft.reads_reference_log_probs(config):
        extras = lambda record: {name: np.float32(record.fields[name]) for name in sft.REFERENCE_FIELDS}
    return sft.fit_examples(config, split, tokenizer, lambda record: tokenize(record, tokenizer, template, add_bos),
                            "pairs", extras)


def to_rows(pair: dict[str, np.ndarray], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One pair -> the features of `lm.data.packing`, each `[2, seq_len]`: row 0 chosen, row 1 rejected; with
    precomputed reference log-probabilities also `reference_log_probs` (fp32), each side's at its last trained
    target and 0 elsewhere, so a row's sum is its sequence's (what `lm.dpo` reads instead of a reference forward)."""
    rows = [sft.to_example({"tokens": pair[f"{side}_tokens"], "trained": pair[f"{side}_trained"]}, seq_len, pad_id)
            for side in SIDES]
    features = {name: np.stack([row[name] for row in rows]) for name in packing.FEATURES}
    if sft.REFERENCE_FIELDS[0] in pair:
        reference_2t = np.zeros((2, seq_len), np.float32)
        for i, name in enumerate(sft.REFERENCE_FIELDS):
            reference_2t[i, np.flatnonzero(features["weights"][i])[-1]] = pair[name]
        features[REFERENCE_FEATURE] = reference_2t
    return features


def stack(pairs: list[dict[str, np.ndarray]], rows: int, padding: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A batch of `rows` rows from `to_rows` pairs, filled up with `padding` rows (weights 0; reference 0)."""
    parts = list(pairs)
    names = list(parts[0]) if parts else list(padding)
    if rows > 2 * len(pairs):
        fill = lambda name: padding[name] if name in padding else np.zeros_like(parts[0][name][0])
        parts.append({name: np.stack([fill(name)] * (rows - 2 * len(pairs))) for name in names})
    return {name: np.concatenate([part[name] for part in parts]) for name in names}
