"""Restore on any mesh, `lm.evaluate` and `lm.generate` on a real (small) training run's workdir (`small_run`)."""

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lm import checkpoint
from lm import config as lm_config
from lm import evaluate
from lm import optim
from lm import sharding
from lm.data import pipeline, sources
from lm.data import tokenizer as tokenizer_lib

pytestmark = pytest.mark.slow


def trainer_eval_loss(workdir, step):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    return next(m["eval_loss"] for m in lines if m["step"] == step and "eval_loss" in m)


def read_eval_json(workdir, step):
    with open(os.path.join(workdir, f"eval_{step}.json")) as f:
        return json.load(f)


def test_checkpoint_from_a_2x2x2_mesh_restores_on_other_meshes_with_the_same_eval_loss(small_run):
    expected = trainer_eval_loss(small_run, 4)
    config = lm_config.read_config(small_run)
    meshes = {
        "one device": sharding.make_mesh(lm_config.load("configs/tiny.py").mesh, jax.devices()[:1]),
        "(1, 4, 2)": sharding.make_mesh(lm_config.load("configs/tiny.py", **{
            "mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2}).mesh),
        "(2, 2, 2)": sharding.make_mesh(config.mesh),
    }
    params = {}
    for name, mesh in meshes.items():
        restored = checkpoint.restore(small_run, mesh=mesh)
        assert restored.step == 4 and restored.opt_state is None
        assert dict(restored.mesh.shape) == dict(mesh.shape)
        results = evaluate.evaluate(restored.config, restored.params, workdir=small_run)
        np.testing.assert_allclose(results["loss"], expected, rtol=1e-5, err_msg=name)
        params[name] = jax.device_get(restored.params)
    for name in meshes:
        jax.tree.map(np.testing.assert_array_equal, params[name], params["one device"])


def test_evaluate_cli_with_the_trainers_eval_steps_reports_the_trainers_eval_loss(small_run, run_lm):
    result = run_lm("lm.evaluate", f"--workdir={small_run}", "--config.eval_steps=2")
    assert "step 4: loss" in result.stdout
    written = read_eval_json(small_run, 4)
    np.testing.assert_allclose(written["loss"], trainer_eval_loss(small_run, 4), rtol=1e-5)
    assert written["batches"] == 2 and written["eval_steps"] == 2
    np.testing.assert_allclose(written["perplexity"], np.exp(written["loss"]), rtol=1e-6)
    assert 0 < written["bits_per_byte"] < written["loss"] / np.log(2)  # Tokens hold more than one byte each.


def test_evaluate_cli_by_default_evaluates_every_target_of_the_split_once_on_any_device_count(small_run, run_lm):
    config = lm_config.read_config(small_run)
    tokenizer = tokenizer_lib.from_workdir(small_run)
    texts = sources.iter_texts(sources.resolve(config, config.data.eval_split))
    # Every token of every document but its first (BOS) is predicted once.
    targets = sum(len(tokenizer.encode(text)) + 1 for text in texts)
    results = {}
    for devices in (1, 8):
        run_lm("lm.evaluate", f"--workdir={small_run}", devices=devices)
        results[devices] = read_eval_json(small_run, 4)
        assert results[devices]["eval_steps"] == -1 and results[devices]["tokens"] == targets
    np.testing.assert_allclose(results[8]["loss"], results[1]["loss"], rtol=1e-6)
    assert results[8]["bytes"] == results[1]["bytes"] and results[8]["batches"] == results[1]["batches"]
    # A finite eval_steps beyond the end of the split stops there, says so, and gives the same numbers.
    beyond = run_lm("lm.evaluate", f"--workdir={small_run}", "--config.eval_steps=100000")
    assert f"config.eval_steps=100000, but split 'validation' ends after {results[1]['batches']} batches" in \
        beyond.stderr
    np.testing.assert_allclose(read_eval_json(small_run, 4)["loss"], results[1]["loss"], rtol=1e-6)


def test_evaluate_all_steps_and_config_overrides(small_run, run_lm):
    result = run_lm("lm.evaluate", f"--workdir={small_run}", "--all_steps", "--config.eval_steps=1")
    assert "step 2: loss" in result.stdout and "step 4: loss" in result.stdout
    for step in (2, 4):
        written = read_eval_json(small_run, step)
        assert written["eval_steps"] == 1 and written["batches"] == 1


def test_bits_per_byte_counts_the_raw_bytes_of_the_evaluated_text(small_run):
    config = lm_config.read_config(small_run)
    tokenizer = tokenizer_lib.from_workdir(small_run)
    table = tokenizer.token_bytes(config.model.vocab_size)
    iterator = pipeline.make_eval_iterator(config, tokenizer=tokenizer)
    batch = next(iterator)
    iterator.close()
    for targets, weights in zip(batch["targets"], batch["weights"]):
        text_ids = [t for t, w in zip(targets.tolist(), weights.tolist()) if w > 0 and t != tokenizer.eos_id]
        assert table[targets].dot(weights) == len(tokenizer.decode(text_ids).encode("utf-8"))


def test_restore_errors_name_the_problem(small_run, run_lm, tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.restore(str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoints"):
        checkpoint.restore(str(empty))
    with pytest.raises(checkpoint.CheckpointError, match=r"step 3 is not among .*\[2, 4\]"):
        checkpoint.restore(small_run, step=3)
    other = lm_config.read_config(small_run)
    other.model.d_model = 32
    with pytest.raises(checkpoint.CheckpointError, match=r"does not fit .*embedding.*\(2048, 64\).*\(2048, 32\)"):
        checkpoint.restore(small_run, config=other)
    result = run_lm("lm.evaluate", f"--workdir={small_run}", "--step=3", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: step 3 is not among the checkpoints")


def test_restore_with_the_optimizer_gives_back_the_saved_optimizer_state(small_run):
    config = lm_config.read_config(small_run)
    restored = checkpoint.restore(small_run, step=2, optimizer=optim.make_optimizer(config))
    assert restored.step == 2
    saved = ocp.PyTreeCheckpointer().restore(os.path.join(small_run, "checkpoints", "2", "state"))
    # orbax gives the saved tree back as nested dicts: compare leaves by their names along the path.
    names = lambda path: tuple(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path)
    by_name = lambda tree: {names(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}
    restored_leaves, saved_leaves = by_name(jax.device_get(restored.opt_state)), by_name(saved["opt_state"])
    assert restored_leaves.keys() == saved_leaves.keys() and len(saved_leaves) > 3
    for name, leaf in restored_leaves.items():
        np.testing.assert_array_equal(leaf, saved_leaves[name], err_msg=str(name))
    moved = sum(leaf.size > 1 and bool(np.any(leaf != 0)) for leaf in restored_leaves.values())
    assert moved > 0, "after 2 steps Adam's moments are not all zero"


def test_generate_cli_prints_a_completion_per_prompt(small_run, run_lm):
    args = [f"--workdir={small_run}", "--prompt=def main(", "--prompt=import", "--max_new_tokens=8",
            "--temperature=0.8", "--top_k=20", "--top_p=0.9", "--seed=1"]
    result = run_lm("lm.generate", *args)
    assert result.stdout.count("=== ") == 2
    assert "=== 'def main(' (step 4)" in result.stdout and "=== 'import' (step 4)" in result.stdout
    assert run_lm("lm.generate", *args).stdout == result.stdout


def test_generate_uses_the_runs_tokenizer_and_never_trains_one(small_run, run_lm, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(small_run, copy)
    os.remove(copy / "tokenizer.model")
    result = run_lm("lm.generate", f"--workdir={copy}", "--prompt=x", "--max_new_tokens=2", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {copy}/tokenizer.model does not exist: the run's tokenizer is missing (lm.train copies it there)")
    assert not (copy / "tokenizer.model").exists()
