"""DPO (`lm.dpo`) against TRL's `DPOTrainer`, the implementation most DPO recipes are written for: the same two tiny
Llamas in fp32, a random reference and a policy near it, saved with transformers and imported into lm with `lm.hf`,
score the same preference pairs. Compared: each sequence's summed completion log-probability under both models (lm's
rows `2i`/`2i + 1` against TRL's chosen-then-rejected halves) within 1e-4, the loss within 1e-5, and the
rewards/logps metrics TRL logs.

The pairs have prompts and completions of different lengths, so both sides pad on the right; lm's batch also ends
with a padding pair (as a stream's last batch does), which must count in none of the means TRL takes over its four.

Compared where the two define the same loss: `sigmoid` without label smoothing (TRL 1.16's `sigmoid` ignores
`label_smoothing`: its conservative DPO is the `robust` loss, another formula) and `ipo`, whose log-ratios both
divide by the completion's token count.
"""

import copy
import functools
import math

import jax
import numpy as np
import pytest
import torch
import transformers
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from lm import checkpoint
from lm import dpo
from lm import model as model_lib
from lm import objective
from lm import sharding
from lm.data import packing, preference
from lm.hf import convert

from test_hf import FP32, LLAMA, VOCAB, make_hf_tokenizer

# Wider weights than transformers' default (0.02), whose next-token distributions are nearly uniform: peaked ones,
# whose log-probabilities depend on the weights enough to show a mismatch.
INITIALIZER_RANGE = 0.3
# The policy is the reference plus noise of this standard deviation: its sequences' log-probabilities then differ
# from the reference's by nats, as after some training, so the losses depend on the log-ratios.
POLICY_DRIFT = 0.05
PAD_ID = 0
# (prompt, chosen, rejected) lengths: chosen longer, shorter or as long as rejected, and rows of several lengths.
LENGTHS = [(3, 4, 2), (7, 1, 5), (5, 6, 6), (2, 3, 8)]
# lm's blockwise log-softmax (`lm.loss`) in three blocks of the 512-token vocabulary, as a large vocabulary has it.
CHUNK_SIZE = 200


def _pairs():
    """Token-id pairs as TRL's tokenized datasets hold them, none of them a special token (ids 0-2)."""
    rng = np.random.default_rng(0)
    return [{"prompt_ids": rng.integers(3, VOCAB, p).tolist(), "chosen_ids": rng.integers(3, VOCAB, c).tolist(),
             "rejected_ids": rng.integers(3, VOCAB, r).tolist()} for p, c, r in LENGTHS]


def _lm_batch(pairs):
    """The pairs as `lm.data.preference` lays them out (the prompt untrained, each completion trained), one padding
    pair at the end."""
    seq_len = max(len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs) - 1
    rows = []
    for pair in pairs:
        sides = {}
        for side in preference.SIDES:
            prompt, completion = pair["prompt_ids"], pair[f"{side}_ids"]
            sides[f"{side}_tokens"] = np.array(prompt + completion, np.int32)
            sides[f"{side}_trained"] = np.array([0] * len(prompt) + [1] * len(completion), np.int32)
        rows.append(preference.to_rows(sides, seq_len, PAD_ID))
    return preference.stack(rows, 2 * len(pairs) + 2, packing.padding_example(seq_len, PAD_ID))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """`{"reference": (torch model, lm restored checkpoint), "policy": ...}`: a random Llama and a policy near it (its
    weights perturbed, as training moves them), each saved by transformers and imported into an lm workdir, fp32."""
    root = tmp_path_factory.mktemp("dpo_trl")
    tokenizer = make_hf_tokenizer()
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**LLAMA, initializer_range=INITIALIZER_RANGE)).eval()
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for weight in policy.parameters():
            weight.add_(POLICY_DRIFT * torch.randn_like(weight))
    models = {}
    for name, hf_model in (("reference", reference), ("policy", policy)):
        hf_model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        # On one device: compiling for the 8 simulated ones would take most of the test's time.
        mesh = sharding.default_mesh(convert.config_for(str(root / name), FP32), jax.devices()[:1])
        workdir = str(root / f"{name}_workdir")
        convert.import_checkpoint(str(root / name), workdir, FP32, mesh)
        models[name] = hf_model, checkpoint.restore(workdir, mesh=mesh)
    return models


@pytest.fixture(scope="module")
def lm_side(models):
    """`(sequence_log_probs, dpo_loss)`, lm's side on the pairs' batch, jitted: `sequence_log_probs(params)` ->
    `(log_prob_p2, tokens_p2)`, each row's summed log-probability and trained-token count as `[pairs, 2]` (chosen,
    rejected; the padding pair dropped); `dpo_loss(loss, beta, trainable, frozen)` -> `(loss, metrics)` as floats,
    compiled once per setting."""
    config = models["policy"][1].config.copy_and_resolve_references()
    config.loss.chunk_size = CHUNK_SIZE
    model = model_lib.build(config)
    batch = _lm_batch(_pairs())

    @jax.jit
    def rows(params):
        hidden_btd, kernel_dv = objective.batch_hidden_and_head(params, batch, model)
        return dpo.sequence_log_probs(hidden_btd, kernel_dv, batch["targets"], batch["weights"],
                                      chunk_size=config.loss.chunk_size, logit_softcap=config.model.logit_softcap)

    def sequence_log_probs(params):
        return tuple(np.asarray(x)[:2 * len(LENGTHS)].reshape(-1, 2) for x in rows(params))

    @functools.cache
    def compiled_loss(loss, beta):
        settings = config.copy_and_resolve_references()
        settings.finetune.dpo.update(loss=loss, beta=beta, label_smoothing=0.0)
        return jax.jit(lambda trainable, frozen: dpo.dpo_loss(trainable, frozen, batch, model, model, settings))

    def dpo_loss(loss, beta, trainable, frozen):
        value, metrics = compiled_loss(loss, beta)(trainable, frozen)
        return float(value), {name: float(v) for name, v in metrics.items()}

    return sequence_log_probs, dpo_loss


def _trl_trainer(models, tmp_path, loss, beta):
    # The trainer insists on a training set; the pairs compared are collated below, not taken from it.
    placeholder = Dataset.from_list([{"prompt": "hello", "chosen": " world", "rejected": " text"}])
    args = DPOConfig(output_dir=str(tmp_path / "trl"), loss_type=loss, beta=beta, bf16=False, use_cpu=True,
                     report_to="none")
    return DPOTrainer(model=models["policy"][0], ref_model=models["reference"][0], args=args,
                      train_dataset=placeholder, processing_class=make_hf_tokenizer())


def test_sequence_log_probs_match_trl(models, lm_side, tmp_path):
    sequence_log_probs, _ = lm_side
    trainer = _trl_trainer(models, tmp_path, "sigmoid", 0.1)
    trl_batch = trainer.data_collator(_pairs())
    for name, trl_model in (("policy", trainer.model), ("reference", trainer.ref_model)):
        # TRL's own per-sequence scores, from whichever model it is given: its fused LM head's log-probabilities of
        # the completion tokens, summed.
        chosen_p, rejected_p = (x.numpy() for x in trainer.compute_ref_log_probs(trl_model, trl_batch))
        log_prob_p2, tokens_p2 = sequence_log_probs(models[name][1].params)
        np.testing.assert_array_equal(tokens_p2, [[c, r] for _, c, r in LENGTHS])  # lm trains each completion.
        np.testing.assert_allclose(log_prob_p2, np.stack([chosen_p, rejected_p], axis=1), rtol=0, atol=1e-4,
                                   err_msg=name)


@pytest.mark.parametrize("loss, beta", [("sigmoid", 0.1), ("sigmoid", 0.5), ("ipo", 0.5)])
def test_dpo_loss_and_metrics_match_trl(models, lm_side, tmp_path, loss, beta):
    trainer = _trl_trainer(models, tmp_path, loss, beta)
    with torch.no_grad():
        expected = trainer.compute_loss(trainer.model, trainer.data_collator(_pairs())).item()
    # The metrics TRL logs, kept under the policy's mode: eval here (no dropout to switch off in either model).
    trl_metrics = {name: values[-1] for name, values in trainer._metrics["eval"].items()}
    _, dpo_loss = lm_side
    got, metrics = dpo_loss(loss, beta, models["policy"][1].params, models["reference"][1].params)
    # Pairs whose log-ratios hardly differ would make either loss nearly a constant of beta, blind to them.
    assert abs(metrics["rewards/margins"]) > beta
    assert abs(got - expected) <= 1e-5, (got, expected)
    assert metrics["weight_sum"] == len(LENGTHS)
    for name in ("logps/chosen", "logps/rejected"):
        assert abs(metrics[name] - trl_metrics[name]) <= 1e-4, (name, metrics[name], trl_metrics[name])
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):  # beta times log-probability differences.
        assert abs(metrics[name] - trl_metrics[name]) <= 1e-4 * beta, (name, metrics[name], trl_metrics[name])
    assert metrics["rewards/accuracies"] == trl_metrics["rewards/accuracies"]


def test_dpo_loss_is_log_2_when_the_policy_is_the_reference(models, lm_side):
    _, dpo_loss = lm_side
    params = models["policy"][1].params
    loss, metrics = dpo_loss("sigmoid", 0.1, params, params)
    assert abs(loss - math.log(2)) <= 1e-6
    assert metrics["rewards/chosen"] == metrics["rewards/rejected"] == metrics["rewards/margins"] == 0.0
