"""A SentencePiece model as a Hugging Face fast tokenizer: the `tokenizer.json` and `tokenizer_config.json` an export
of a run trained with its own SentencePiece tokenizer carries, so `transformers.AutoTokenizer` loads it and encodes
exactly as lm did.

The `tokenizers` pipeline mirrors SentencePiece's: the normalizer writes each space as "▁" (and puts one in front
of the text when the model adds a dummy prefix); the model is a BPE whose merges are SentencePiece's pieces in
order of score (SentencePiece's BPE merges the adjacent pair whose union is the best-scoring piece), or a Unigram
with the same pieces and scores (exact for BPE, lm's default; a Unigram model's ties between equally scored
segmentations, such as runs of spaces, may be broken the other way); characters outside the vocabulary fall back
to byte pieces `<0xNN>`; decoding turns "▁" back into spaces and joins the bytes. A post-processor puts BOS in
front of every text, as lm's data pipeline does for each document. Normalization rules other than `identity`
(NFKC tables) are refused: their tables do not carry over.
"""

from __future__ import annotations

import json

from absl import logging
from sentencepiece import sentencepiece_model_pb2

from lm.data import tokenizer as tokenizer_lib
from lm.errors import ConfigError

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6  # ModelProto.SentencePiece.Type
_UNIGRAM, _BPE = 1, 2  # TrainerSpec.ModelType
_SPACE = "▁"


def convert(tokenizer: tokenizer_lib.SentencePieceTokenizer, model_max_length: int) -> dict[str, bytes]:
    """`tokenizer.json` and `tokenizer_config.json` of `tokenizer`, by file name; ConfigError naming the setting
    that has no equivalent."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer.processor.serialized_model_proto())
    normalizer_spec, trainer_spec = proto.normalizer_spec, proto.trainer_spec
    what = "the run's SentencePiece tokenizer"
    if normalizer_spec.name not in ("identity", "") or normalizer_spec.remove_extra_whitespaces:
        raise ConfigError(f"{what} normalizes text (rule {normalizer_spec.name!r}, remove_extra_whitespaces="
                          f"{normalizer_spec.remove_extra_whitespaces}); only identity normalization exports to "
                          f"tokenizer.json")
    if trainer_spec.model_type not in (_UNIGRAM, _BPE) or trainer_spec.treat_whitespace_as_suffix:
        raise ConfigError(f"{what} is of model type {trainer_spec.model_type} (treat_whitespace_as_suffix="
                          f"{trainer_spec.treat_whitespace_as_suffix}); only BPE and Unigram with whitespace as a "
                          f"prefix export to tokenizer.json")
    pieces = [(piece.piece, piece.score, piece.type) for piece in proto.pieces]
    unk_id = next((i for i, (_, _, kind) in enumerate(pieces) if kind == _UNKNOWN), None)
    if trainer_spec.model_type == _BPE:
        model = models.BPE(vocab={piece: i for i, (piece, _, _) in enumerate(pieces)}, merges=_merges(pieces),
                           unk_token=None if unk_id is None else pieces[unk_id][0],
                           byte_fallback=trainer_spec.byte_fallback)
    else:
        logging.warning("%s is a Unigram model: tokenizer.json breaks ties between equally scored segmentations "
                        "(e.g. of long runs of spaces) its own way, so a few texts may encode differently", what)
        model = models.Unigram([(piece, score) for piece, score, _ in pieces], unk_id=unk_id,
                               byte_fallback=trainer_spec.byte_fallback)
    fast = Tokenizer(model)
    replace = [normalizers.Replace(" ", _SPACE)] if normalizer_spec.escape_whitespaces else []
    prefix = [normalizers.Prepend(_SPACE)] if normalizer_spec.add_dummy_prefix else []
    fast.normalizer = normalizers.Sequence(prefix + replace)
    strip = [decoders.Strip(" ", 1, 0)] if normalizer_spec.add_dummy_prefix else []
    fast.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()] + strip)
    fast.add_special_tokens([AddedToken(piece, special=True, normalized=False)
                             for piece, _, kind in pieces if kind in (_CONTROL, _UNKNOWN)])
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
                "clean_up_tokenization_spaces": False}
    for name in ("bos", "eos", "pad", "unk"):
        token_id = unk_id if name == "unk" else getattr(tokenizer, f"{name}_id")
        if token_id is not None:
            settings[f"{name}_token"] = pieces[token_id][0]
    if tokenizer.bos_id is not None:
        bos = pieces[tokenizer.bos_id][0]
        fast.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_id)])
    return {tokenizer_lib.HF_FILE: fast.to_str().encode(),
            tokenizer_lib.HF_CONFIG_FILE: json.dumps(settings, indent=2, ensure_ascii=False).encode()}


def _merges(pieces: list[tuple[str, float, int]]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's: every split `left + right` of a mergeable piece into two pieces of
    the vocabulary, best-scoring merged piece first (ties: the earlier id, as SentencePiece's own order)."""
    mergeable = {piece: i for i, (piece, _, kind) in enumerate(pieces) if kind == _NORMAL}
    ranked = []
    for piece, i in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-pieces[i][1], i, mergeable[left], (left, right)))
    return [merge for *_, merge in sorted(ranked)]
