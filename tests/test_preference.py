"""Preference data (`lm.data.preference`): pairs of a chosen and a rejected completion of one prompt, as strings or
chat messages; the masks of both sides, bad records in one line, and the rows a batch lays them out in."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import config as lm_config
from lm import dpo
from lm.data import preference, sft
from lm.data import tokenizer as tokenizer_lib
from lm.errors import EmptyDatasetError, RecordError

PROMPT_MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                   {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"}]
STRING_PAIR = {"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " 5"}
CHAT_PAIR = {"prompt": PROMPT_MESSAGES, "chosen": [{"role": "assistant", "content": "4"}],
             "rejected": [{"role": "assistant", "content": "it is 5"}]}


def _config(files: str = "", **data):
    """The data fields preference records are read with."""
    config = lm_config.base_config()
    config.data.update(source="files", files=files, format="preference", seq_len=32, batch_size=4, **data)
    return config


def _records_file(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def _runs(tokenizer, ids, trained) -> list[tuple[bool, str]]:
    """The token sequence as runs of (trained, text)."""
    runs = []
    for token, flag in zip(ids, trained):
        piece = {tokenizer.bos_id: "<s>", tokenizer.eos_id: "</s>"}.get(token) or tokenizer.decode([token])
        if runs and runs[-1][0] == bool(flag):
            runs[-1] = (bool(flag), runs[-1][1] + piece)
        else:
            runs.append((bool(flag), piece))
    return runs


def _sides(tokenizer_path, record):
    tokenizer = tokenizer_lib.load(tokenizer_path)
    template, add_bos = sft.chat_template(_config(), tokenizer)
    sides = preference.tokenize(sft.Record("p.jsonl:1", record), tokenizer, template, add_bos)
    return {side: _runs(tokenizer, *sides[f"{side}_"]) for side in preference.SIDES}


def test_string_pairs_train_each_completion_and_eos(sentencepiece_tokenizer):
    assert _sides(sentencepiece_tokenizer, STRING_PAIR) == {
        "chosen": [(False, "<s>Q: 2+2?\nA:"), (True, " 4</s>")],
        "rejected": [(False, "<s>Q: 2+2?\nA:"), (True, " 5</s>")]}


def test_chat_pairs_train_only_their_own_assistant_turns(sentencepiece_tokenizer):
    prompt = "<s>System: Be brief.\nUser: hi\nAssistant: hello</s>User: 2+2?\nAssistant:"
    assert _sides(sentencepiece_tokenizer, CHAT_PAIR) == {  # The prompt's assistant turn ("hello") is not trained.
        "chosen": [(False, prompt), (True, " 4</s>")], "rejected": [(False, prompt), (True, " it is 5</s>")]}


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "Q", "chosen": " 4"}, "needs a field 'rejected'"),
    ({"prompt": "Q", "chosen": " 4", "rejected": " 4"}, "has 'chosen' identical to 'rejected'"),
    ({"prompt": "Q", "chosen": "", "rejected": " 4"}, "empty 'chosen'"),
    ({"prompt": "Q", "chosen": [{"role": "assistant", "content": "4"}], "rejected": " 5"},
     r"needs a string field 'chosen' \(got list\)"),
    ({**CHAT_PAIR, "rejected": [{"role": "user", "content": "5"}]},
     "of 'rejected' must end with an assistant message, ends with 'user'"),
    ({**CHAT_PAIR, "chosen": [{"role": "robot", "content": "4"}]}, "message 0 of 'chosen' has role 'robot'"),
])
def test_a_malformed_pair_is_one_line_naming_file_and_line(tmp_path, bad, message):
    files = _records_file(tmp_path / "pairs.jsonl", [STRING_PAIR, CHAT_PAIR, bad])
    with pytest.raises(RecordError, match=r"pairs\.jsonl:3: a preference record.*" + message):
        sft.resolve(_config(files), "train")


def _split(records) -> sft.SftSplit:
    """The records as one split, without files."""
    return sft.SftSplit("train", "preference", tuple(sft.Record(f"p.jsonl:{i}", r) for i, r in enumerate(records, 1)),
                        "pairs", "x")


def test_overlong_pairs_are_truncated_or_dropped_whole_and_counted(sentencepiece_tokenizer):
    long_rejected = {**STRING_PAIR, "rejected": " hello it is 4." * 12}
    records = _split([STRING_PAIR] * 20 + [long_rejected] * 3)
    tokenizer = tokenizer_lib.load(sentencepiece_tokenizer)
    truncated = preference.examples(_config(), records, tokenizer)
    assert (len(truncated.examples), truncated.truncated, truncated.dropped_overlong) == (23, 3, 0)
    assert "23 pairs of 23 records; 3 truncated" in truncated.report(records, 32)
    assert all(len(pair["rejected_tokens"]) <= 33 for pair in truncated.examples)
    dropped = preference.examples(_config(overlong="drop"), records, tokenizer)
    assert (len(dropped.examples), dropped.dropped_overlong) == (20, 3)  # The chosen side goes with its pair.
    with pytest.raises(EmptyDatasetError, match="0 pairs of 3 records"):
        preference.examples(_config(overlong="drop"), _split([long_rejected] * 3), tokenizer)


def test_a_batch_holds_each_pair_in_two_rows_that_share_the_prompt(sentencepiece_tokenizer):
    tokenizer = tokenizer_lib.load(sentencepiece_tokenizer)
    pairs = preference.examples(_config(), _split([STRING_PAIR, CHAT_PAIR]), tokenizer).examples
    padding = {name: np.zeros_like(value[0]) for name, value in preference.to_rows(pairs[0], 32, 0).items()}
    batch = preference.stack([preference.to_rows(pair, 32, 0) for pair in pairs], 6, padding)
    assert batch["inputs"].shape == (6, 32) and not batch["weights"][4:].any()  # A padding pair fills the batch.
    for i, pair in enumerate(pairs):
        chosen, rejected = 2 * i, 2 * i + 1
        for row, side in ((chosen, "chosen"), (rejected, "rejected")):
            n = len(pair[f"{side}_tokens"])
            np.testing.assert_array_equal(batch["inputs"][row, :n - 1], pair[f"{side}_tokens"][:-1])
            np.testing.assert_array_equal(batch["weights"][row, :n - 1], pair[f"{side}_trained"][1:])
            assert not batch["weights"][row, n - 1:].any() and batch["segment_ids"][row, n - 2] == 1
        prompt = int(np.argmax(batch["weights"][chosen] > 0))  # The input that predicts the first trained token.
        assert prompt == int(np.argmax(batch["weights"][rejected] > 0)) > 0
        np.testing.assert_array_equal(batch["inputs"][chosen, :prompt + 1], batch["inputs"][rejected, :prompt + 1])


# ---------------------------------------------------------------------------------------------------------------
# The DPO losses (`lm.dpo`), against their formulas computed by hand.

POLICY = np.array([-3.0, -5.0, -7.5, -6.0, -2.0, -2.5])  # Three pairs: (chosen, rejected) summed log-probs.
REFERENCE = np.array([-4.0, -4.5, -7.0, -6.5, -2.0, -2.5])
TOKENS = np.array([3.0, 5.0, 2.0, 4.0, 6.0, 1.0])


def test_dpo_loss_is_log_2_when_the_policy_is_the_reference():
    loss, metrics = dpo.preference_loss(jnp.asarray(POLICY), jnp.asarray(POLICY), jnp.asarray(TOKENS), beta=0.1)
    np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-7)
    assert metrics["rewards/margins"] == 0 and metrics["rewards/accuracies"] == 0 and metrics["pairs"] == 3


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_dpo_loss_and_metrics_equal_the_formula(label_smoothing):
    beta = 0.1
    loss, metrics = dpo.preference_loss(jnp.asarray(POLICY), jnp.asarray(REFERENCE), jnp.asarray(TOKENS), beta=beta,
                                        label_smoothing=label_smoothing)
    ratio_chosen, ratio_rejected = (POLICY - REFERENCE)[0::2], (POLICY - REFERENCE)[1::2]  # [1, -0.5, 0], [-0.5, 0.5, 0]
    margin = beta * (ratio_chosen - ratio_rejected)
    log_sigmoid = lambda x: -np.log1p(np.exp(-x))
    expected = np.mean(-(1 - label_smoothing) * log_sigmoid(margin) - label_smoothing * log_sigmoid(-margin))
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(metrics["rewards/chosen"], beta * ratio_chosen.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["rewards/rejected"], beta * ratio_rejected.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["rewards/margins"], margin.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["rewards/accuracies"], 1 / 3)  # Only the first pair prefers its chosen side.
    np.testing.assert_allclose(metrics["logps/chosen"], POLICY[0::2].mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["logps/rejected"], POLICY[1::2].mean(), rtol=1e-6)


def test_ipo_loss_uses_length_normalised_log_ratios():
    beta = 0.5
    loss, _ = dpo.preference_loss(jnp.asarray(POLICY), jnp.asarray(REFERENCE), jnp.asarray(TOKENS), beta=beta,
                                  loss="ipo")
    normalised = (POLICY - REFERENCE) / TOKENS
    np.testing.assert_allclose(loss, np.mean((normalised[0::2] - normalised[1::2] - 1 / (2 * beta)) ** 2), rtol=1e-6)


def test_padding_pairs_count_in_no_loss_and_no_metric():
    pad = lambda x, fill: jnp.asarray(np.concatenate([x, [fill, fill]]))
    padded = dpo.preference_loss(pad(POLICY, 0.0), pad(REFERENCE, 0.0), pad(TOKENS, 0.0), beta=0.1)
    plain = dpo.preference_loss(jnp.asarray(POLICY), jnp.asarray(REFERENCE), jnp.asarray(TOKENS), beta=0.1)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-7), padded, plain)


def test_sequence_log_probs_sum_the_trained_tokens_log_softmax():
    hidden_btd = jax.random.normal(jax.random.key(0), (4, 6, 8))
    kernel_dv = jax.random.normal(jax.random.key(1), (8, 50))
    targets_bt = jax.random.randint(jax.random.key(2), (4, 6), 0, 50)
    weights_bt = (jax.random.uniform(jax.random.key(3), (4, 6)) > 0.4).astype(jnp.float32)
    log_prob_b, tokens_b = dpo.sequence_log_probs(hidden_btd, kernel_dv, targets_bt, weights_bt, chunk_size=16)
    log_softmax_btv = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", hidden_btd, kernel_dv,
                                                    precision=jax.lax.Precision.HIGHEST))
    expected_bt = jnp.take_along_axis(log_softmax_btv, targets_bt[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(log_prob_b, jnp.sum(expected_bt * weights_bt, axis=1), rtol=1e-5)
    np.testing.assert_array_equal(tokens_b, weights_bt.sum(axis=1))
