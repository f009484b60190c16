"""Preference learning end to end on `lm.bench.rlhf`'s synthetic task: DPO, a reward model and PPO each start from
the same small SFT base and must learn a rule the base does not follow (prefer answers that say `hello`, which the
base says 15% of the time and never greedily); held-out pairs and prompts are sums the training prompts never have.
"""

import json
import os

import jax
import numpy as np
import pytest

from lm import checkpoint
from lm import rl
from lm import train as train_lib
from lm.bench import rlhf
from lm.data import tokenizer as tokenizer_lib
from lm.errors import ConfigError, RecordError


@pytest.fixture(scope="module")
def task(tmp_path_factory, sentencepiece_tokenizer):
    """`(files, base workdir, tokenizer path, root)`: the task's files and the SFT base (`lm.bench.rlhf`)."""
    root = tmp_path_factory.mktemp("rlhf")
    files = rlhf.write_task(str(root))
    base = str(root / "base")
    train_lib.train(rlhf.config(sentencepiece_tokenizer, **rlhf.base_overrides(files)), base)
    return files, base, sentencepiece_tokenizer, root


def test_dpo_learns_the_preferred_rule_on_held_out_prompts(task):
    files, base, tokenizer, root = task
    assert rlhf.hello_rate(base, tokenizer) <= 0.1  # The base does not follow the rule.
    workdir = str(root / "dpo")
    train_lib.train(rlhf.config(tokenizer, **rlhf.dpo_overrides(files, base)), workdir)
    results = rlhf.held_out_results(workdir, files["held_out_pairs"], reference=checkpoint.restore(base).params)
    assert results["pairs"] > 30 and results["rewards/accuracies"] >= 0.9
    assert rlhf.hello_rate(workdir, tokenizer) >= 0.8


@pytest.fixture(scope="module")
def reward_model(task) -> str:
    """The workdir of a reward model trained on the task's pairs from the base (full parameters and a new head)."""
    files, base, tokenizer, root = task
    workdir = str(root / "reward_model")
    train_lib.train(rlhf.config(tokenizer, **rlhf.reward_model_overrides(files, base)), workdir)
    return workdir


def test_a_reward_model_ranks_held_out_pairs(task, reward_model):
    first = json.loads(open(os.path.join(reward_model, "metrics.jsonl")).readline())
    assert first["pairs"] == 8  # batch_size 16 rows: 8 pairs a step.
    results = rlhf.held_out_results(reward_model, task[0]["held_out_pairs"])
    assert results["pairs"] > 30 and results["accuracy"] >= 0.9 and results["margin"] > 0


def _ppo_config(task, **overrides):
    files, base, tokenizer, _ = task
    return rlhf.config(tokenizer, **rlhf.ppo_overrides(files, base, **overrides))


def _metric_lines(workdir) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def test_ppo_raises_a_verifiable_reward_while_the_kl_stays_under_its_target(task, tmp_path):
    rl.train(_ppo_config(task, total_steps=10), str(tmp_path / "ppo"))
    lines = _metric_lines(tmp_path / "ppo")
    rewards = [line["reward"] for line in lines]
    base_reward = rewards[0]  # Step 1's rollouts come from the base itself.
    assert 0 < base_reward < 0.3
    assert np.mean(rewards[-4:]) >= min(3 * base_reward, 0.8)
    assert max(line["kl"] for line in lines) < 6.0
    assert {"policy/clipfrac", "value_loss", "entropy", "kl_coef", "policy/approxkl"} <= set(lines[-1])


def test_ppo_resumes_bitwise_equal_to_an_uninterrupted_run(task, tmp_path, compilation_cache):
    config = _ppo_config(task, total_steps=3, checkpoint_every=2, **{"data.batch_size": 16, "rl.minibatches": 2,
                                                                       "rl.epochs": 2})
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    rl.train(config, straight)
    train_lib._faults.fail_at_step = 3  # A crash as step 3 starts; step 2's checkpoint is on disk.
    try:
        with pytest.raises(RuntimeError, match="injected failure"):
            rl.train(config, resumed)
    finally:
        train_lib._faults.fail_at_step = None
    rl.train(config, resumed)
    drop_times = lambda lines: [{k: v for k, v in line.items() if not k.endswith(("_time", "_per_sec"))}
                                for line in lines]
    assert drop_times(_metric_lines(straight)) == drop_times(_metric_lines(resumed))
    a, b = checkpoint.restore(straight), checkpoint.restore(resumed)
    assert a.step == b.step == 3
    assert tokenizer_lib.in_workdir(straight)  # lm.generate, lm.evaluate and exports read it there.
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_ppo_scored_by_a_reward_model_raises_its_score(task, reward_model, tmp_path, run_lm):
    files, base, _, _ = task
    workdir = str(tmp_path / "ppo")
    # The program as a user runs it (one device): configs/tiny.py with the task's settings.
    run_lm("lm.rl", "--config=configs/tiny.py", f"--workdir={workdir}", f"--config.init_from={base}",
           "--config.finetune.objective=ppo", f"--config.rl.prompts={files['prompts']}",
           f"--config.rl.reward_model={reward_model}", "--config.rl.max_new_tokens=8", "--config.data.seq_len=32",
           "--config.data.batch_size=32", "--config.loss.chunk_size=128", "--config.optim.warmup_steps=0",
           "--config.optim.learning_rate=1e-3", "--config.total_steps=8", "--config.log_every=1")
    rewards = [line["reward"] for line in _metric_lines(workdir)]
    assert np.mean(rewards[-2:]) > rewards[0] + 0.5


def test_bad_ppo_settings_are_one_line_before_any_rollout(task, tmp_path):
    base = task[1]
    with pytest.raises(ConfigError, match="exactly one"):
        _ppo_config(task, **{"rl.reward_model": base})
    with pytest.raises(ConfigError, match="batch_size=32 must split into config.rl.minibatches=3"):
        _ppo_config(task, **{"rl.minibatches": 3})
    with pytest.raises(ConfigError, match="kl_target adapts"):
        _ppo_config(task, **{"rl.kl_coef": 0.0})
    with pytest.raises(ConfigError, match="is a run with finetune.objective='sft', not a reward model"):
        rl.train(_ppo_config(task, **{"rl.reward_fn": "", "rl.reward_model": base}),
                 str(tmp_path / "not_a_reward_model"))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(RecordError, match=r"bad.jsonl:2: a prompt record needs 'prompt'"):
        rl.train(_ppo_config(task, **{"rl.prompts": str(tmp_path / "bad.jsonl")}), str(tmp_path / "bad"))
    with pytest.raises(ConfigError, match="cannot be imported"):
        rl.train(_ppo_config(task, **{"rl.reward_fn": "lm.bench.rlhf:no_such_function"}), str(tmp_path / "no_fn"))
    with pytest.raises(ConfigError, match="python -m lm.rl"):
        train_lib.train(_ppo_config(task), str(tmp_path / "wrong_program"))
