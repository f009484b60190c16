"""Token documents -> fixed-length examples, in one of three layouts (`LAYOUTS`).

A document is `[BOS] + tokens + [EOS]` (no BOS when the tokenizer has none). Both modes cut token streams into
windows of `seq_len + 1` tokens and turn each window `w` into one example of length L = seq_len:

    inputs      = w[:-1]                       int32 [L]
    targets     = w[1:]                        int32 [L]
    segment_ids = segment of inputs[i]         int32 [L]  1, 2, ... per document in the row; 0 on padding
    positions   = index of inputs[i] in its segment within the row   int32 [L]  restarts at 0 for every segment
    weights     = 1.0 where targets[i] is in the same segment as inputs[i], else 0.0   float32 [L]

so a token never attends to (the model masks attention by `segment_ids`) or predicts across a document boundary:
the position holding a document's EOS has weight 0 (its target would be the next document's BOS), and padding has
weight 0. EOS itself is a target (of the document's last token), so the model learns where documents end. A
document continued from the previous window starts its segment there at position 0 (positions are per row).

- `pack` (training, `config.data.pack=True`): grain's `ConcatThenSplitIterDataset` concatenates documents and cuts
  the stream into consecutive, non-overlapping windows of `seq_len + 1` (the first token of each window is not a
  target: 1 in L+1 tokens); only the very end of a finite stream is padded.
- `pad` (`config.data.pack=False`): every document on its own rows, one `document_windows` window per row, padded.
- `windows` (evaluation): the same windows, packed whole into rows by grain's first-fit packer
  (`FirstFitPackIterDataset`), never split. Every token of a document except its first is a target exactly once,
  and its loss depends only on its window (attention stays in the segment, positions restart), not on which row or
  process the window landed in: evaluating a split gives the same sums on any number of processes and devices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

FEATURES = ("inputs", "targets", "segment_ids", "positions", "weights")
LAYOUTS = ("pack", "pad", "windows")


def window_to_example(tokens_w: np.ndarray, segment_ids_w: np.ndarray, positions_w: np.ndarray
                      ) -> dict[str, np.ndarray]:
    """One window of `seq_len + 1` tokens -> one example of length seq_len (module docstring).

    Args:
      tokens_w: int32 [L+1] token ids (padding: any id).
      segment_ids_w: int32 [L+1], 1.. per document in the window, 0 on padding.
      positions_w: int32 [L+1], position of each token within its segment.
    Returns:
      dict of `inputs`, `targets`, `segment_ids`, `positions` (int32 [L]) and `weights` (float32 [L]).
    """
    segment_in, segment_out = segment_ids_w[:-1], segment_ids_w[1:]
    return {
        "inputs": tokens_w[:-1].astype(np.int32),
        "targets": tokens_w[1:].astype(np.int32),
        "segment_ids": segment_in.astype(np.int32),
        "positions": positions_w[:-1].astype(np.int32),
        "weights": ((segment_in != 0) & (segment_out == segment_in)).astype(np.float32),
    }


def _cts_to_example(window: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A packed row from grain's packers (`tokens`, `tokens_segment_ids`, `tokens_positions`) -> an example."""
    return window_to_example(window["tokens"], window["tokens_segment_ids"], window["tokens_positions"])


def pack(token_docs: grain.IterDataset, seq_len: int) -> grain.IterDataset:
    """Packs `{'tokens': int32 [n]}` documents into examples of length `seq_len` (module docstring)."""
    windows = grain.experimental.ConcatThenSplitIterDataset(
        token_docs, length_struct={"tokens": seq_len + 1}, split_full_length_features=True)
    return windows.map(_cts_to_example)


def document_windows(tokens: np.ndarray, seq_len: int) -> list[np.ndarray]:
    """A document's tokens cut into windows of at most `seq_len + 1` tokens, each starting where the last one's final
    token is (a stride of `seq_len`), so every token but the first is a target in exactly one window. A last window
    of one token (nothing to predict) is left out."""
    return [tokens[start:start + seq_len + 1] for start in range(0, max(len(tokens) - 1, 1), seq_len)]


class _DocumentWindows(grain.experimental.FlatMapTransform):
    """One `{'tokens': [n]}` document -> its `document_windows`, each a `{'tokens': [<= seq_len + 1]}` element."""

    max_fan_out = 1 << 20  # Not enforced by FlatMapIterDataset; documents may be arbitrarily long.

    def __init__(self, seq_len: int):
        self._seq_len = seq_len

    def flat_map(self, document: Mapping[str, np.ndarray]) -> Sequence[dict[str, np.ndarray]]:
        return [{"tokens": window} for window in document_windows(document["tokens"], self._seq_len)]


def _padded_window_example(window: Mapping[str, np.ndarray], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One window of `n <= seq_len + 1` tokens alone on a row: segment 1, positions 0..n-1, then padding."""
    n = len(window["tokens"])
    tokens_w = np.full(seq_len + 1, pad_id, np.int32)
    tokens_w[:n] = window["tokens"]
    segment_ids_w = (np.arange(seq_len + 1) < n).astype(np.int32)
    positions_w = np.where(segment_ids_w == 1, np.arange(seq_len + 1), 0).astype(np.int32)
    return window_to_example(tokens_w, segment_ids_w, positions_w)


def pad(token_docs: grain.IterDataset, seq_len: int, pad_id: int) -> grain.IterDataset:
    """One document per row: `{'tokens': int32 [n]}` documents -> padded examples of length `seq_len`."""
    windows = grain.experimental.FlatMapIterDataset(token_docs, _DocumentWindows(seq_len))
    return windows.map(lambda window: _padded_window_example(window, seq_len, pad_id))


def pack_windows(token_docs: grain.IterDataset, seq_len: int, rows: int) -> grain.IterDataset:
    """Evaluation: `document_windows` packed whole, first fit, into rows of `seq_len + 1` tokens (module docstring);
    `rows` packing bins are filled at a time (a batch's worth), in storage order."""
    windows = grain.experimental.FlatMapIterDataset(token_docs, _DocumentWindows(seq_len))
    packed = grain.experimental.FirstFitPackIterDataset(
        windows, length_struct={"tokens": seq_len + 1}, num_packing_bins=rows, shuffle_bins=False)
    return packed.map(_cts_to_example)


def padding_example(seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """An all-padding example (weights 0), used to fill the last batch of a finite stream."""
    zeros = np.zeros(seq_len, np.int32)
    return {"inputs": zeros + pad_id, "targets": zeros + pad_id, "segment_ids": zeros, "positions": zeros,
            "weights": np.zeros(seq_len, np.float32)}


def restore_state_types(state: Any) -> Any:
    """Undoes what a JSON round trip does to grain's ConcatThenSplit state (tuples -> lists).

    The packer compares its `remainder_slices` with the tuple `(-1, -1)`; after JSON they are lists and the
    comparison is always unequal, which would restore a wrong window. Other values pass through unchanged.
    """
    if isinstance(state, dict):
        return {k: ({f: tuple(s) for f, s in v.items()} if k == "remainder_slices" and isinstance(v, dict)
                    else restore_state_types(v)) for k, v in state.items()}
    if isinstance(state, list):
        return [restore_state_types(v) for v in state]
    return state
