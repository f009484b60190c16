"""Restore on any mesh, `lm.evaluate` and `lm.generate` on a real (small) training run's workdir."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from lm import checkpoint
from lm import config as lm_config
from lm import evaluate
from lm import sharding
from lm.data import pipeline
from lm.data import tokenizer as tokenizer_lib

pytestmark = pytest.mark.slow

# configs/tiny.py shrunk; 4 heads / 2 KV heads so a (data, fsdp, tensor) = (2, 2, 2) mesh splits heads too.
RUN = [
    "--config=configs/tiny.py", "--config.model.num_layers=2", "--config.model.d_model=64",
    "--config.model.num_heads=4", "--config.model.num_kv_heads=2", "--config.model.mlp_dim=128",
    "--config.data.seq_len=32", "--config.data.batch_size=8", "--config.log_every=1", "--config.eval_every=4",
    "--config.eval_steps=2", "--config.checkpoint_every=2", "--config.total_steps=4",
    "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
]


def environment(devices):
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}


def run_module(module, *args, devices=1, check=True):
    result = subprocess.run([sys.executable, "-m", module, *args], env=environment(devices), capture_output=True,
                            text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{module} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A 4-step run trained on a (2, 2, 2) mesh of 8 devices, checkpoints at steps 2 and 4, evaluated at step 4."""
    root = tmp_path_factory.mktemp("run")
    workdir = str(root / "workdir")
    run_module("lm.train", f"--workdir={workdir}", *RUN, f"--config.data.cache_dir={root / 'cache'}", devices=8)
    return workdir


def trainer_eval_loss(workdir, step):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    return next(m["eval_loss"] for m in lines if m["step"] == step and "eval_loss" in m)


def test_checkpoint_from_a_2x2x2_mesh_restores_on_other_meshes_with_the_same_eval_loss(workdir):
    expected = trainer_eval_loss(workdir, 4)
    config = checkpoint.read_config(workdir)
    meshes = {
        "one device": sharding.make_mesh(lm_config.load("configs/tiny.py").mesh, jax.devices()[:1]),
        "(1, 4, 2)": sharding.make_mesh(lm_config.load("configs/tiny.py", **{
            "mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2}).mesh),
        "(2, 2, 2)": sharding.make_mesh(config.mesh),
    }
    params = {}
    for name, mesh in meshes.items():
        restored = checkpoint.restore(workdir, mesh=mesh)
        assert restored.step == 4 and restored.opt_state is None
        assert dict(restored.mesh.shape) == dict(mesh.shape)
        results = evaluate.evaluate(restored.config, restored.params, workdir=workdir)
        np.testing.assert_allclose(results["loss"], expected, rtol=1e-5, err_msg=name)
        params[name] = jax.device_get(restored.params)
    for name in meshes:
        jax.tree.map(np.testing.assert_array_equal, params[name], params["one device"])


def test_evaluate_cli_reports_the_trainers_eval_loss_and_writes_eval_json(workdir):
    result = run_module("lm.evaluate", f"--workdir={workdir}")
    assert "step 4: loss" in result.stdout
    with open(os.path.join(workdir, "eval_4.json")) as f:
        written = json.load(f)
    np.testing.assert_allclose(written["loss"], trainer_eval_loss(workdir, 4), rtol=1e-5)
    assert written["tokens"] == 2 * 8 * 32  # eval_steps batches of 8 x 32 tokens, all real text (packed).
    np.testing.assert_allclose(written["perplexity"], np.exp(written["loss"]), rtol=1e-6)
    assert 0 < written["bits_per_byte"] < written["loss"] / np.log(2)  # Tokens hold more than one byte each.


def test_evaluate_all_steps_and_config_overrides(workdir):
    result = run_module("lm.evaluate", f"--workdir={workdir}", "--all_steps", "--config.eval_steps=1")
    assert "step 2: loss" in result.stdout and "step 4: loss" in result.stdout
    for step in (2, 4):
        with open(os.path.join(workdir, f"eval_{step}.json")) as f:
            written = json.load(f)
        assert written["eval_steps"] == 1 and written["tokens"] == 8 * 32


def test_bits_per_byte_counts_the_raw_bytes_of_the_evaluated_text(workdir):
    config = checkpoint.read_config(workdir)
    tokenizer = tokenizer_lib.get_tokenizer(config, workdir=workdir)
    table = evaluate.piece_bytes(tokenizer, config.model.vocab_size)
    iterator = pipeline.make_eval_iterator(config, workdir=workdir)
    batch = next(iterator)
    iterator.close()
    for targets, weights in zip(batch["targets"], batch["weights"]):
        text_ids = [t for t, w in zip(targets.tolist(), weights.tolist()) if w > 0 and not tokenizer.is_control(t)]
        assert table[targets].dot(weights) == len(tokenizer.decode(text_ids).encode("utf-8"))


def test_restore_errors_name_the_problem(workdir, tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.restore(str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoints"):
        checkpoint.restore(str(empty))
    with pytest.raises(checkpoint.CheckpointError, match=r"step 3 is not among .*\[2, 4\]"):
        checkpoint.restore(workdir, step=3)
    other = checkpoint.read_config(workdir)
    other.model.d_model = 32
    with pytest.raises(checkpoint.CheckpointError, match=r"does not fit .*embedding.*\(2048, 64\).*\(2048, 32\)"):
        checkpoint.restore(workdir, config=other)
    result = run_module("lm.evaluate", f"--workdir={workdir}", "--step=3", check=False)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: step 3 is not among the checkpoints")


def test_restore_with_optimizer_state(workdir):
    restored = checkpoint.restore(workdir, step=2, optimizer_state=True)
    assert restored.step == 2
    assert restored.opt_state is not None
    # AdamW's first moment mirrors the parameters.
    assert jax.tree.structure(restored.params) == jax.tree.structure(restored.opt_state[-1][0].mu)


def test_generate_cli_prints_a_completion_per_prompt(workdir):
    result = run_module("lm.generate", f"--workdir={workdir}", "--prompt=def main(", "--prompt=import",
                        "--max_new_tokens=8", "--temperature=0.8", "--top_k=20", "--top_p=0.9", "--seed=1")
    assert result.stdout.count("=== ") == 2
    assert "=== 'def main(' (step 4)" in result.stdout and "=== 'import' (step 4)" in result.stdout
    again = run_module("lm.generate", f"--workdir={workdir}", "--prompt=def main(", "--prompt=import",
                       "--max_new_tokens=8", "--temperature=0.8", "--top_k=20", "--top_p=0.9", "--seed=1")
    assert again.stdout == result.stdout
