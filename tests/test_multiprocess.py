"""Two local processes (4 simulated CPU devices each, gloo collectives) train, checkpoint, resume and evaluate as one
program, and match a single process on 8 devices with the same global batch."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import environment

pytestmark = pytest.mark.slow

# configs/tiny.py shrunk, synthetic data (its global batch does not depend on the process count), ZeRO stage 1, a
# constant learning rate after warm-up so a run stopped at step 3 and resumed to step 6 follows the 6-step run.
RUN = [
    "--config=configs/tiny.py", "--config.model.num_layers=2", "--config.model.d_model=64",
    "--config.model.num_heads=4", "--config.model.num_kv_heads=2", "--config.model.mlp_dim=128",
    "--config.data.source=synthetic", "--config.data.seq_len=32", "--config.data.batch_size=16",
    "--config.sharding.zero_stage=1", "--config.optim.schedule=constant", "--config.optim.warmup_steps=2",
    "--config.log_every=1", "--config.checkpoint_every=3", "--config.eval_every=3", "--config.eval_steps=2",
]
TIMEOUT = 300


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_processes(module, *args, processes=2, devices=4):
    port = free_port()
    extra = [] if processes == 1 else [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}"]
    return [subprocess.Popen(
        [sys.executable, "-m", module, *args, *extra, *([] if processes == 1 else [f"--process_id={i}"])],
        env=environment(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(processes)]


def run_processes(module, *args, processes=2, devices=4, on_start=None):
    """Runs `python -m module args` as `processes` cooperating processes; returns process 0's stdout.

    `on_start(procs)`, if given, is called once they are started (to signal them)."""
    procs = start_processes(module, *args, processes=processes, devices=devices)
    outputs = []
    try:
        if on_start:
            on_start(procs)
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT))
    finally:
        for proc in procs:  # A process whose peer died would wait for it forever: stop them all.
            proc.kill()
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, f"{module} failed ({proc.returncode}):\n{out[-3000:]}\n{err[-3000:]}"
    return outputs[0][0]


def metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    single, multi = str(root / "single"), str(root / "multi")
    run_processes("lm.train", f"--workdir={single}", *RUN, "--config.total_steps=6", processes=1, devices=8)
    run_processes("lm.train", f"--workdir={multi}", *RUN, "--config.total_steps=3")
    resumed = run_processes("lm.train", f"--workdir={multi}", *RUN, "--config.total_steps=6")
    return single, multi, resumed


def test_two_processes_resume_and_match_one_process_on_eight_devices(runs):
    single, multi, resumed = runs
    assert "resumed from step 3" in resumed
    assert "2 process(es)" in resumed
    expected = {m["step"]: m["loss"] for m in metrics(single) if "loss" in m}
    got = {m["step"]: m["loss"] for m in metrics(multi) if "loss" in m}
    assert sorted(got) == list(range(1, 7))  # Process 0 alone writes, one line per step, no duplicates on resume.
    np.testing.assert_allclose([got[s] for s in range(1, 7)], [expected[s] for s in range(1, 7)], rtol=1e-5)
    data_files = sorted(os.listdir(os.path.join(multi, "checkpoints", "3", "data")))
    assert [f for f in data_files if f.endswith(".json")] == ["process_0-of-2.json", "process_1-of-2.json"]


def test_two_process_evaluation_agrees_with_one_process(runs):
    single, multi, _ = runs
    run_processes("lm.evaluate", f"--workdir={multi}", "--config.eval_steps=2")
    with open(os.path.join(multi, "eval_6.json")) as f:
        two_processes = json.load(f)
    run_processes("lm.evaluate", f"--workdir={multi}", "--config.eval_steps=2", processes=1, devices=8)
    with open(os.path.join(multi, "eval_6.json")) as f:
        one_process = json.load(f)
    np.testing.assert_allclose(two_processes["loss"], one_process["loss"], rtol=1e-5)
    assert two_processes["tokens"] == one_process["tokens"] == 2 * 16 * 32
    logged = next(m["eval_loss"] for m in metrics(single) if m["step"] == 6 and "eval_loss" in m)
    np.testing.assert_allclose(one_process["loss"], logged, rtol=1e-5)


def test_whole_split_evaluation_is_the_same_on_two_processes_and_one(runs, lm_cache, tmp_path):
    """Text documents, sharded over the processes unevenly: the process that runs out first feeds padding until
    the other is done, and the sums equal one process's."""
    from lm import config as lm_config
    from lm.data import sources, tokenizer_training

    _, multi, _ = runs
    workdir = tmp_path / "workdir"
    shutil.copytree(multi, workdir)
    config = lm_config.read_config(multi)
    config.data.source, config.data.cache_dir = "default", lm_cache
    # The synthetic run has no tokenizer: give it the default corpus's (its vocabulary fits the model's 2048).
    tokenizer_training.get_or_train(config, sources.resolve(config, "train"), workdir=str(workdir))
    args = [f"--workdir={workdir}", "--config.data.source=default", f"--config.data.cache_dir={lm_cache}",
            "--config.data.eval_split=validation[:5]"]
    results = {}
    for processes, devices in ((2, 4), (1, 8)):
        run_processes("lm.evaluate", *args, processes=processes, devices=devices)
        with open(workdir / "eval_6.json") as f:
            results[processes] = json.load(f)
    assert results[2]["eval_steps"] == -1
    assert results[2]["tokens"] == results[1]["tokens"] > 0 and results[2]["bytes"] == results[1]["bytes"]
    np.testing.assert_allclose(results[2]["loss"], results[1]["loss"], rtol=1e-6)


def test_resuming_under_another_process_count_fails_in_one_line(runs):
    _, multi, _ = runs
    procs = start_processes("lm.train", f"--workdir={multi}", *RUN, "--config.total_steps=9", processes=1, devices=8)
    out, err = procs[0].communicate(timeout=TIMEOUT)
    assert procs[0].returncode != 0
    assert err.strip().splitlines()[-1] == (
        "error: checkpoint 6 holds no data state for process 0 of 1: it was saved by another number of processes; "
        "resume with the process count it was saved with")


def test_sigterm_on_both_processes_saves_one_agreed_step_and_exits_zero(tmp_path):
    workdir = str(tmp_path / "preempted")

    def preempt_after_a_few_steps(procs):
        deadline = time.time() + TIMEOUT
        path = os.path.join(workdir, "metrics.jsonl")
        while not (os.path.exists(path) and len(metrics(workdir)) >= 3) and time.time() < deadline:
            time.sleep(0.5)
        for proc in procs:  # Not at the same instant: the processes must still agree on one step.
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)

    out = run_processes("lm.train", f"--workdir={workdir}", *RUN, "--config.total_steps=1000",
                        "--config.checkpoint_every=1000", "--config.eval_every=1000",
                        on_start=preempt_after_a_few_steps)
    saved = os.listdir(os.path.join(workdir, "checkpoints"))
    assert len(saved) == 1 and f"SIGTERM: saved a checkpoint at step {saved[0]}, exiting" in out
    assert 3 <= int(saved[0]) < 1000
