"""lm as an lm-evaluation-harness model (`lm.harness`) against the harness's own Hugging Face backend (`HFLM`) on
the same weights: a tiny random Llama built with transformers, imported into lm; the three shipped offline tasks,
every request compared; batch size, bucketing and an 8-device mesh change nothing; the command line."""

import json
import math
import os
import subprocess
import sys

import jax
import lm_eval
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
import numpy as np
import pytest
from tokenizers import processors
import torch

from lm import evaluate
from lm import harness
from lm import sharding
from lm.hf import convert
from lm.harness import model as harness_model

import test_hf
from conftest import REPO, environment


pytestmark = pytest.mark.slow

# A context window much shorter than the perplexity task's documents (each 3x or more of it), and than the longest
# multiple-choice request (71 tokens), so rolling windows and left truncation both happen.
MAX_LENGTH = 64


def save_imported(root):
    """`(hf directory, lm workdir)` under `root` of a tiny random Llama whose tokenizer adds BOS to every text, as
    Llama 3's does (a post-processor), saved by transformers and imported into lm in float32."""
    tokenizer = test_hf.make_hf_tokenizer()
    bos = tokenizer.convert_tokens_to_ids("<s>")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    hf_dir, workdir = os.path.join(root, "hf"), os.path.join(root, "workdir")
    test_hf.save_hf_model("llama3 rope scaling", hf_dir, tokenizer)
    convert.import_checkpoint(hf_dir, workdir, test_hf.FP32)
    return hf_dir, workdir


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    return save_imported(str(tmp_path_factory.mktemp("harness")))


def one_device_mesh():
    return jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1, 1), sharding.MESH_AXES)


def shipped_tasks():
    """A task manager of lm's tasks alone: indexing the harness's thousands of built-in tasks takes 10 s."""
    return TaskManager(include_path=harness.TASKS_DIR, include_defaults=False)


def run_tasks(model, task_manager):
    """`simple_evaluate` on the three shipped tasks, with every request's response logged."""
    return lm_eval.simple_evaluate(model=model, tasks=list(harness.SHIPPED_TASKS), task_manager=task_manager,
                                   log_samples=True, bootstrap_iters=0)


@pytest.fixture(scope="module")
def results(imported):
    """The harness's results of HFLM and of lm in three placements, computed once for the module's tests."""
    hf_dir, workdir = imported
    tasks = shipped_tasks()
    return {
        "hf": run_tasks(HFLM(pretrained=hf_dir, batch_size=1, max_length=MAX_LENGTH, device="cpu",
                             dtype="float32"), tasks),
        "lm, 1 device, batch 32": run_tasks(harness_model.HarnessModel(
            workdir, batch_size=32, max_length=MAX_LENGTH, mesh=one_device_mesh()), tasks),
        "lm, 1 device, batch 1": run_tasks(harness_model.HarnessModel(
            workdir, batch_size=1, max_length=MAX_LENGTH, mesh=one_device_mesh()), tasks),
        "lm, (2, 2, 2) mesh, batch 32": run_tasks(harness_model.HarnessModel(
            workdir, batch_size=32, max_length=MAX_LENGTH,
            mesh=jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 2, 1, 2), sharding.MESH_AXES)), tasks),
    }


def responses(result, task):
    """Each request's response, in the harness's order: `(log-likelihood, is_greedy)`, a rolling log-likelihood,
    or a generated text."""
    return [response for sample in result["samples"][task] for [response] in sample["resps"]]


def assert_same_answers(got, expected, loglikelihood_atol, rolling_atol, rtol=0.0):
    choice, expected_choice = responses(got, "lm_python_choice"), responses(expected, "lm_python_choice")
    assert len(choice) == len(expected_choice) == 4 * 24
    np.testing.assert_allclose([ll for ll, _ in choice], [ll for ll, _ in expected_choice], rtol=rtol,
                               atol=loglikelihood_atol)
    assert [greedy for _, greedy in choice] == [greedy for _, greedy in expected_choice]
    rolling, expected_rolling = responses(got, "lm_python_perplexity"), responses(expected, "lm_python_perplexity")
    assert len(rolling) == 5
    np.testing.assert_allclose(rolling, expected_rolling, rtol=rtol, atol=rolling_atol)
    generated = responses(got, "lm_arithmetic")
    assert len(generated) == 32 and generated == responses(expected, "lm_arithmetic")


def assert_same_scores(got, expected):
    for task, metrics in expected["results"].items():
        for name, value in metrics.items():
            if "_stderr" in name:
                continue
            if name.startswith(("acc", "exact_match")):
                assert got["results"][task][name] == value, (task, name)
            elif "perplexity" in name or name.startswith("bits_per_byte"):
                np.testing.assert_allclose(got["results"][task][name], value, rtol=1e-5, err_msg=f"{task} {name}")


def test_every_request_and_score_matches_the_harness_hf_backend(results):
    for placement in ("lm, 1 device, batch 32", "lm, (2, 2, 2) mesh, batch 32"):
        assert_same_answers(results[placement], results["hf"], loglikelihood_atol=1e-4, rolling_atol=1e-3)
        assert_same_scores(results[placement], results["hf"])


def test_batch_size_bucketing_and_an_8_device_mesh_change_nothing(results):
    one = results["lm, 1 device, batch 32"]
    for placement in ("lm, 1 device, batch 1", "lm, (2, 2, 2) mesh, batch 32"):
        # Other shapes round differently in float32: the same up to its rounding.
        assert_same_answers(results[placement], one, loglikelihood_atol=1e-5, rolling_atol=1e-4, rtol=1e-6)
        assert_same_scores(results[placement], one)


def test_the_shipped_tasks_scores_follow_from_their_data_and_the_responses(results):
    """The task files are wired as meant: every line of each JSON lines file is a document; accuracy is the share of
    questions whose `gold` choice has the largest log-likelihood; byte perplexity is exp(-log-likelihood / UTF-8
    bytes) over the documents; exact match compares the generation, leading space removed, with the sum."""
    result = results["lm, 1 device, batch 32"]
    for task in harness.SHIPPED_TASKS:
        with open(os.path.join(harness.TASKS_DIR, f"{task}.jsonl")) as f:
            assert [sample["doc"] for sample in result["samples"][task]] == [json.loads(line) for line in f]
    questions = result["samples"]["lm_python_choice"]
    accuracy = np.mean([np.argmax([ll for [(ll, _)] in q["resps"]]) == q["doc"]["gold"] for q in questions])
    assert result["results"]["lm_python_choice"]["acc,none"] == pytest.approx(accuracy)
    documents = result["samples"]["lm_python_perplexity"]
    log_likelihood = sum(ll for document in documents for [ll] in document["resps"])
    text_bytes = sum(len(document["doc"]["text"].encode()) for document in documents)
    assert result["results"]["lm_python_perplexity"]["byte_perplexity,none"] == pytest.approx(
        math.exp(-log_likelihood / text_bytes), rel=1e-6)
    sums = result["samples"]["lm_arithmetic"]
    exact = np.mean([s["resps"][0][0].lstrip() == s["doc"]["answer"] for s in sums])
    assert result["results"]["lm_arithmetic"]["exact_match,strip"] == pytest.approx(exact)


def test_greedy_generation_and_is_greedy_agree_with_the_hf_backend(imported):
    """`generate_until` gives HFLM's texts; a context's greedy continuation (token ids, from transformers' greedy
    `generate`) is `is_greedy` for both models with the same log-likelihood, and a changed one is not."""
    hf_dir, workdir = imported
    hf = HFLM(pretrained=hf_dir, batch_size=4, max_length=MAX_LENGTH, device="cpu", dtype="float32")
    ours = harness_model.HarnessModel(workdir, batch_size=4, max_length=MAX_LENGTH)
    contexts = ["def f(x):\n    return", "The quick brown fox", "hello world, the model"]
    kwargs = {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}
    requests = [Instance("generate_until", {}, (context, kwargs), i) for i, context in enumerate(contexts)]
    assert ours.generate_until(requests) == hf.generate_until(requests)
    token_requests = []
    for context in contexts:
        context_ids = hf.tok_encode(context)
        with torch.no_grad():
            greedy_ids = hf.model.generate(torch.tensor([context_ids]), max_new_tokens=4, do_sample=False,
                                           pad_token_id=0)[0, len(context_ids):].tolist()
        changed_ids = greedy_ids[:2] + [(greedy_ids[2] + 1) % test_hf.VOCAB] + greedy_ids[3:]
        # One-token answers after the same context share one row in lm (and one forward pass in hf).
        one_token = [(None, context_ids, [(greedy_ids[0] + shift) % test_hf.VOCAB]) for shift in range(4)]
        token_requests += [(None, context_ids, greedy_ids), (None, context_ids, changed_ids), *one_token]
    expected, got = hf._loglikelihood_tokens(token_requests), ours._loglikelihood_tokens(token_requests)
    np.testing.assert_allclose([ll for ll, _ in got], [ll for ll, _ in expected], atol=1e-4, rtol=0)
    assert [greedy for _, greedy in got] == [greedy for _, greedy in expected] == [
        True, False, True, False, False, False] * len(contexts)


def test_loglikelihood_on_an_lm_run_starts_documents_with_bos_as_training_did(small_run):
    """On a run of lm's own (SentencePiece tokenizer), a context is BOS + its text, and a continuation's
    log-likelihood is the sum of its tokens' (`lm.evaluate.token_losses` of the whole sequence)."""
    ours = harness_model.HarnessModel(small_run, batch_size=2)
    tokenizer = ours.tokenizer
    context, continuation = "def main():\n    return", " None\n"
    [(log_likelihood, _)] = ours.loglikelihood([Instance("loglikelihood", {}, (context, continuation), 0)])
    whole = [tokenizer.bos_id] + tokenizer.encode(context + continuation)
    scored = len(whole) - len([tokenizer.bos_id] + tokenizer.encode(context))
    losses = evaluate.token_losses(ours.config, ours.params, whole)
    np.testing.assert_allclose(log_likelihood, -losses[-scored:].sum(), rtol=1e-5)


def test_bucketed_lengths_waste_at_most_half_and_stop_at_the_context_window():
    assert [harness_model.bucket_length(n, 2048) for n in (1, 16, 17, 25, 33, 49, 65, 97, 129, 2000)] == [
        16, 16, 24, 32, 48, 64, 96, 128, 192, 2048]
    assert harness_model.bucket_length(100, 100) == 100
    assert all(n <= harness_model.bucket_length(n, 4096) <= max(16, 1.5 * n) for n in range(1, 4097))


def test_the_command_line_runs_a_shipped_task_and_writes_the_results_into_the_workdir(imported):
    _, workdir = imported
    result = subprocess.run(
        [sys.executable, "-m", "lm.harness", "--model", "lm", "--model_args", f"workdir={workdir}",
         "--tasks", "lm_python_choice", "--limit", "4", "--batch_size", "8"],
        cwd=REPO, env=environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lm_python_choice" in result.stdout and "acc" in result.stdout
    with open(os.path.join(workdir, "eval_harness_0.json")) as f:
        written = json.load(f)
    assert written["config"]["step"] == 0 and written["config"]["workdir"] == workdir
    assert 0 <= written["results"]["lm_python_choice"]["acc,none"] <= 1


def test_without_the_harness_the_command_says_how_to_install_it():
    script = ("import runpy, sys; sys.modules['lm_eval'] = None; sys.argv = ['lm.harness', '--model', 'lm']; "
              "runpy.run_module('lm.harness', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=environment(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"error: python -m lm.harness: {harness.MISSING}"
