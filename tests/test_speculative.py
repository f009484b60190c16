"""Speculative decoding (`lm.speculative`): greedy output identical to plain greedy decoding, sampled output
distributed as the target's (chi-square at each position), the fallback after a useless draft, and the CLI."""

import itertools
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats

from lm import config as lm_config
from lm import generate
from lm import model as model_lib
from lm import sampling
from lm.bench import draft_data as bench_draft_data


def model(layers, d, seed, vocab=64, init_std=0.02):
    config = lm_config.load("configs/tiny.py", **{
        "model.num_layers": layers, "model.d_model": d, "model.num_heads": 4, "model.num_kv_heads": 2,
        "model.mlp_dim": 2 * d, "model.vocab_size": vocab, "model.max_seq_len": 96, "model.init_std": init_std})
    return config, nn.unbox(model_lib.init(model_lib.build(config), jax.random.key(seed)))


def perturbed(params, scale, seed):
    """The parameters with relative Gaussian noise: a draft that agrees with its target most of the time."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jnp.std(x) * jax.random.normal(k, x.shape, x.dtype)
                                     for x, k in zip(leaves, keys)])


def test_greedy_speculative_decoding_gives_plain_greedy_tokens_on_64_prompts():
    config, params = model(2, 64, seed=1, init_std=0.1)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 64, rng.integers(1, 16)).tolist() for _ in range(64)]
    plain = generate.generate(config, params, prompts, max_new_tokens=24, eos_id=3)
    other_config, other_params = model(1, 32, seed=5)
    for name, draft in [("close draft", generate.Draft(config, perturbed(params, 0.05, 2), tokens=4)),
                        ("unrelated draft", generate.Draft(other_config, other_params, tokens=3, min_acceptance=0.0))]:
        counts = {}
        got = generate.generate(config, params, prompts, max_new_tokens=24, eos_id=3, draft=draft, stats=counts)
        assert got == plain, name
        # Both accepting and rejecting happened (so did rolling both caches back), every round speculated.
        assert 0 < counts["accepted"] < counts["proposed"], (name, counts)
        print(name, counts)


def _exact_marginals(config, params, prompt, positions):
    """The target's exact distribution of each of the next `positions` tokens after `prompt` (temperature 1),
    summed over every continuation before it: `[positions, vocab]`."""
    model_ = model_lib.build(config)
    vocab = config.model.vocab_size
    forward = jax.jit(lambda tokens: jax.nn.softmax(model_.apply(
        {"params": params}, model_.apply({"params": params}, tokens)[:, -1], method=model_.logits)))
    conditional, marginals = {}, []  # conditional: prefix -> the distribution of the token after it.
    for position in range(positions):
        prefixes = list(itertools.product(range(vocab), repeat=position))
        next_pv = np.asarray(forward(jnp.asarray([prompt + list(p) for p in prefixes], jnp.int32)), np.float64)
        prefix_p = np.array([np.prod([conditional[p[:j]][p[j]] for j in range(position)]) for p in prefixes])
        marginals.append(prefix_p @ next_pv)
        conditional.update({p: next_pv[i] for i, p in enumerate(prefixes)})
    return np.stack(marginals)


def test_sampled_speculative_tokens_follow_the_targets_distribution_chi_square():
    vocab, rows, positions = 8, 3000, 3
    config, params = model(2, 32, seed=1, vocab=vocab, init_std=0.5)
    draft_config, draft_params = model(1, 32, seed=7, vocab=vocab, init_std=0.5)
    prompt = [1, 5, 2]
    settings = sampling.Sampling(temperature=1.0)
    want_pv = _exact_marginals(config, params, prompt, positions)
    want_pv = want_pv / want_pv.sum(axis=1, keepdims=True)  # Exactly 1 (float rounding), as chisquare checks.
    counts = {}
    got = generate.generate(config, params, [prompt] * rows, max_new_tokens=positions, sampling=settings, seed=11,
                            draft=generate.Draft(draft_config, draft_params, tokens=2, min_acceptance=0.0),
                            stats=counts)
    assert 0 < counts["accepted"] < counts["proposed"], counts
    got_pv = np.stack([np.bincount([row[i] for row in got], minlength=vocab) for i in range(positions)])
    for i in range(positions):
        p_value = scipy_stats.chisquare(got_pv[i], rows * want_pv[i]).pvalue
        assert p_value > 1e-3, (i, got_pv[i] / rows, want_pv[i], p_value)
    # The test can tell distributions apart: the draft's own samples fail it at the first position.
    drafted = generate.generate(draft_config, draft_params, [prompt] * rows, max_new_tokens=1, sampling=settings,
                                seed=11)
    draft_counts = np.bincount([row[0] for row in drafted], minlength=vocab)
    assert scipy_stats.chisquare(draft_counts, rows * want_pv[0]).pvalue < 1e-3


def test_a_useless_draft_is_dropped_after_the_probe_rounds_and_stops_still_hold():
    config, params = model(2, 64, seed=1, init_std=0.1)
    other_config, other_params = model(1, 32, seed=5)
    prompts = [[5, 9, 13], [40, 41, 2, 7]]
    settings = sampling.Sampling(temperature=0.0, repetition_penalty=1.3, no_repeat_ngram_size=2)
    plain = generate.generate(config, params, prompts, max_new_tokens=40, sampling=settings, stop_ids=(7,))
    counts = {}
    got = generate.generate(config, params, prompts, max_new_tokens=40, sampling=settings, stop_ids=(7,),
                            draft=generate.Draft(other_config, other_params, tokens=4, min_acceptance=0.9),
                            stats=counts)
    assert got == plain
    assert counts["rounds"] == 4 and counts["accepted"] < 0.9 * counts["proposed"], counts


def test_mismatched_drafts_are_refused_before_compiling():
    config, params = model(2, 64, seed=1)
    small_vocab, small_params = model(1, 32, seed=5, vocab=32)
    with pytest.raises(generate.ArgumentError, match="draft's config.model.vocab_size=32 differs"):
        generate.generate(config, params, [[1, 2]], max_new_tokens=4, draft=generate.Draft(small_vocab, small_params))
    with pytest.raises(generate.ArgumentError, match="draft_tokens must be >= 1"):
        generate.Draft(config, params, tokens=0)


def test_generate_cli_with_a_draft_run(small_run, run_lm, sentencepiece_tokenizer, tmp_path):
    args = [f"--workdir={small_run}", "--prompt=def main(", "--max_new_tokens=12", "--repetition_penalty=1.2"]
    plain = run_lm("lm.generate", *args).stdout
    speculative = run_lm("lm.generate", *args, f"--draft_workdir={small_run}", "--draft_tokens=3").stdout
    # The run drafting for itself: every drafted token accepted, the same text.
    assert speculative.startswith(plain.rstrip("\n")) and "speculative decoding: " in speculative
    accepted, proposed = speculative.split("speculative decoding: ")[1].split(" drafted")[0].split(" of ")
    assert int(accepted) == int(proposed) > 0
    other = tmp_path / "other_tokenizer"
    shutil.copytree(small_run, other)
    shutil.copy(sentencepiece_tokenizer, os.path.join(other, "tokenizer.model"))
    result = run_lm("lm.generate", *args, f"--draft_workdir={other}", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "has another tokenizer than --workdir" in result.stderr.strip().splitlines()[-1]


def test_draft_data_and_the_decoding_benchmark_on_trained_runs(small_run, run_lm, tmp_path):
    """`lm.bench.draft_data` writes the target's greedy continuations of corpus openings; `lm.bench.decode` decodes
    validation openings with a draft run (here the target itself: every drafted token accepted, the same tokens)."""
    import json

    from lm import checkpoint
    from lm.data import tokenizer as tokenizer_lib

    run_lm("lm.bench.draft_data", f"--workdir={small_run}", f"--out={tmp_path}", "--prompts=3",
           "--prompt_tokens=6", "--new_tokens=5", "--batch=2")
    texts = [json.loads(line)["text"] for line in open(tmp_path / "continuations.jsonl")]
    tokenizer = tokenizer_lib.from_workdir(small_run)
    restored = checkpoint.restore(small_run)
    prompts = bench_draft_data.corpus_prompts(tokenizer, 3, 6)
    replies = generate.generate(restored.config, restored.params, prompts, max_new_tokens=5, eos_id=tokenizer.eos_id)
    eos = tokenizer.eos_id
    assert texts == [tokenizer.decode(p[1:] + [t for t in r if t != eos]) for p, r in zip(prompts, replies)]
    out = run_lm("lm.bench.decode", f"--workdir={small_run}", f"--draft_workdir={small_run}", "--prompts=2",
                 "--prompt_length=6", "--new_tokens=8", "--batch_sizes=1", "--repeats=1", "--transformers=false").stdout
    close = next(line for line in out.splitlines() if line.strip().startswith(small_run))
    accepted, same = close.split()[-4], close.split()[-1]
    assert float(accepted) == 1.0 and same == "yes", out
