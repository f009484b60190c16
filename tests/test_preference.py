"""Preference data (`lm.data.preference`): pairs of a chosen and a rejected completion of one prompt, as strings or
chat messages; the masks of both sides, bad records in one line, and the rows a batch lays them out in."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import checkpoint
from lm import config as lm_config
from lm import dpo
from lm import evaluate as evaluate_lib
from lm import flops
from lm import init_from as init_from_lib
from lm import preflight
from lm import train as train_lib
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


def test_the_sft_term_adds_the_chosen_completions_mean_token_nll():
    plain, _ = dpo.preference_loss(jnp.asarray(POLICY), jnp.asarray(REFERENCE), jnp.asarray(TOKENS), beta=0.1)
    loss, metrics = dpo.preference_loss(jnp.asarray(POLICY), jnp.asarray(REFERENCE), jnp.asarray(TOKENS), beta=0.1,
                                        sft_weight=0.5)
    nll = -(-3.0 - 7.5 - 2.0) / (3.0 + 2.0 + 6.0)  # Chosen rows' summed log-probs over their tokens.
    np.testing.assert_allclose(metrics["sft_nll"], nll, rtol=1e-6)
    np.testing.assert_allclose(loss, plain + 0.5 * nll, rtol=1e-6)


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


# ---------------------------------------------------------------------------------------------------------------
# DPO runs: the trainer, checkpoints, resume and evaluation with the dpo objective.


def _pairs(count: int) -> list[dict]:
    """Sums answered right (chosen) and off by one (rejected)."""
    return [{"prompt": f"Q: {a}+{b}?\nA:", "chosen": f" {a + b}", "rejected": f" {a + b + 1}"}
            for a, b in zip(range(count), reversed(range(count)))]


def _tiny(**overrides):
    """A 2-layer model on synthetic tokens (the base), or with overrides a DPO run over it."""
    config = lm_config.base_config()
    config.model.update(vocab_size=384, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                        max_seq_len=64, dtype="float32", remat_policy="none")
    config.data.update(source="synthetic", seq_len=32, batch_size=8)
    config.loss.chunk_size = 128
    config.optim.update(warmup_steps=0, learning_rate=1e-2)
    config.update(total_steps=2, log_every=1, eval_every=100, eval_steps=1, checkpoint_every=2)
    config.update_from_flattened_dict(overrides)
    return lm_config.validate(config)


@pytest.fixture(scope="module")
def dpo_setup(tmp_path_factory, sentencepiece_tokenizer):
    root = tmp_path_factory.mktemp("dpo")
    train_lib.train(_tiny(), str(root / "base"))
    files = _records_file(root / "pairs.jsonl", _pairs(40))
    return str(root / "base"), files, sentencepiece_tokenizer


def _dpo_config(setup, method, **overrides):
    base, files, tokenizer = setup
    return _tiny(**{"init_from": base, "finetune.method": method, "finetune.objective": "dpo",
                    "data.source": "files", "data.files": files, "data.format": "preference",
                    "data.tokenizer.path": tokenizer, "data.eval_split": "train", "total_steps": 4,
                    "eval_every": 4, "eval_steps": 2, **overrides})


def _metric_lines(workdir) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_dpo_run_starts_at_log_2_resumes_exactly_and_evaluates_against_its_reference(dpo_setup, tmp_path, method,
                                                                                      compilation_cache):
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train_lib.train(_dpo_config(dpo_setup, method), straight)
    train_lib._faults.fail_at_step = 3  # A crash as step 3 starts; step 2's checkpoint is on disk.
    try:
        with pytest.raises(RuntimeError, match="injected failure"):
            train_lib.train(_dpo_config(dpo_setup, method), interrupted)
    finally:
        train_lib._faults.fail_at_step = None
    train_lib.train(_dpo_config(dpo_setup, method), interrupted)
    lines = _metric_lines(straight)
    steps = [line for line in lines if "loss" in line]
    # Step 1: the policy is its reference (LoRA's B = 0; full DPO's copy), so every pair's loss is log 2.
    assert steps[0]["loss"] == pytest.approx(np.log(2.0), abs=1e-6) and steps[0]["rewards/margins"] == 0
    assert steps[0]["pairs"] == 4 and steps[-1]["rewards/margins"] != 0
    assert [s["loss"] for s in steps] == [s["loss"] for s in _metric_lines(interrupted) if "loss" in s]
    last_eval = [line for line in lines if "eval_loss" in line][-1]
    assert {"eval_rewards/accuracies", "eval_logps/chosen", "eval_pairs"} <= set(last_eval)
    restored = checkpoint.restore(straight)
    reference = None if method == "lora" else checkpoint.restore(dpo_setup[0]).params
    results = evaluate_lib.evaluate(restored.config, restored.params, workdir=straight, reference=reference)
    assert results["loss"] == pytest.approx(last_eval["eval_loss"], rel=1e-6)
    assert results["rewards/accuracies"] == pytest.approx(last_eval["eval_rewards/accuracies"])


def test_dpo_flops_count_the_reference_forward_and_preflight_the_reference_copy(dpo_setup):
    lora, full = (init_from_lib.with_source_model(_dpo_config(dpo_setup, method)) for method in ("lora", "full"))
    for config in (lora, full):
        plain = config.copy_and_resolve_references()
        plain.finetune.objective, plain.data.format = "sft", "prompt_completion"
        extra = flops.train_flops_per_token(config, 32) - flops.train_flops_per_token(plain, 32)
        assert extra == 2 * flops.matmul_param_count(config) + flops.attention_flops_per_token(config, 32) / 3
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    full_sft = full.copy_and_resolve_references()
    full_sft.finetune.objective, full_sft.data.format = "sft", "prompt_completion"
    copy = preflight.estimate(full, sizes).stages[1].params
    assert copy == 2 * preflight.estimate(full_sft, sizes).stages[1].params


def test_reference_log_probs_precomputed_with_the_data_train_like_the_reference_model(dpo_setup, tmp_path,
                                                                                       compilation_cache):
    from lm import reference_log_probs
    from lm import train_step as train_step_lib

    scored_dir = tmp_path / "scored"
    assert reference_log_probs.precompute(_dpo_config(dpo_setup, "full"), str(scored_dir)) == 40
    scored = scored_dir / "pairs.jsonl"
    records = [json.loads(line) for line in scored.read_text().splitlines()]
    assert all(r["ref_chosen_logps"] < 0 and r["ref_rejected_logps"] < 0 for r in records)
    precomputed = _dpo_config(dpo_setup, "full", **{"data.files": str(scored), "finetune.dpo.reference": "precomputed"})
    with_model, from_data = str(tmp_path / "model"), str(tmp_path / "precomputed")
    train_lib.train(_dpo_config(dpo_setup, "full"), with_model)
    train_lib.train(precomputed, from_data)
    expected, got = ([line for line in _metric_lines(workdir) if "loss" in line] for workdir in (with_model, from_data))
    assert got[0]["loss"] == pytest.approx(np.log(2.0), abs=1e-6)
    for a, b in zip(expected, got):  # The same sequences, scored by the same weights in another program.
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["rewards/margins"] == pytest.approx(a["rewards/margins"], abs=1e-5)
    # lm.evaluate reads such a run without a reference too.
    restored = checkpoint.restore(from_data)
    _, results = next(evaluate_lib.evaluate_checkpoints(from_data, [None], restored.config))
    assert results["loss"] == pytest.approx([line for line in _metric_lines(from_data) if "eval_loss" in line][-1][
        "eval_loss"], rel=1e-6)
    # No reference copy is held and no reference forward counted.
    resolved = init_from_lib.with_source_model(precomputed)
    assert train_step_lib.build(resolved).shardings.frozen == {}
    plain = resolved.copy_and_resolve_references()
    plain.finetune.objective, plain.data.format = "sft", "prompt_completion"
    assert flops.train_flops_per_token(resolved, 32) == flops.train_flops_per_token(plain, 32)
    # A record without its reference numbers is one line naming it.
    broken = tmp_path / "broken"
    broken.mkdir()
    del records[6]["ref_rejected_logps"]
    _records_file(broken / "pairs.jsonl", records)
    with pytest.raises(RecordError, match=r"pairs.jsonl:7: .*needs a number 'ref_rejected_logps'"):
        train_lib.train(_dpo_config(dpo_setup, "full", **{"data.files": str(broken / "pairs.jsonl"),
                                                          "finetune.dpo.reference": "precomputed"}),
                        str(tmp_path / "broken_run"))
