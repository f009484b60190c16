"""Workdirs survive bad input and failures: real subprocesses on copies of a real run's workdir. Every case checks
the exit code, a one-line message without a traceback, and that every byte the workdir held before is still there
(only the documented additions: the `lock` file, `eval_<step>.json`, moved-aside damaged checkpoints)."""

import glob
import gzip
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import SMALL_MODEL, environment

pytestmark = pytest.mark.slow

RUN = [*SMALL_MODEL, "--config.log_every=1", "--config.eval_every=100", "--config.eval_steps=1",
       "--config.checkpoint_every=2", "--config.optim.warmup_steps=2"]
ADDITIONS = {"lock"}  # Written by every trainer that got as far as locking the workdir; empty once it exits.


@pytest.fixture(scope="module")
def train(run_lm):
    def run(workdir, *extra, total_steps=6, check=True):
        return run_lm("lm.train", f"--workdir={workdir}", *RUN, f"--config.total_steps={total_steps}", *extra,
                      check=check)

    return run


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, train):
    """A 6-step run: checkpoints 2, 4, 6."""
    workdir = tmp_path_factory.mktemp("finished") / "workdir"
    train(workdir)
    return workdir


@pytest.fixture
def workdir(finished_run, tmp_path):
    copy = tmp_path / "workdir"
    shutil.copytree(finished_run, copy)
    return copy


def snapshot(workdir) -> dict[str, str]:
    """sha256 of every file under `workdir` but the documented additions, by relative path."""
    hashes = {}
    for path in glob.glob(os.path.join(workdir, "**", "*"), recursive=True):
        relative = os.path.relpath(path, workdir)
        if os.path.isfile(path) and relative not in ADDITIONS:
            with open(path, "rb") as f:
                hashes[relative] = hashlib.sha256(f.read()).hexdigest()
    return hashes


def assert_one_line_error(result, message):
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, last


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def final_params(workdir, step):
    return ocp.PyTreeCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))["params"]


# ---------------------------------------------------------------------------------------------------------------
# A failed resume changes nothing.


@pytest.mark.parametrize("override,message", [
    ("--config.data.seq_len=16", "data iterator state was saved with seq_len=32 but this pipeline has seq_len=16"),
    ("--config.data.batch_size=4", "data iterator state was saved with local_batch_size=8"),
    ("--config.data.source=synthetic", "data iterator state was saved with source="),
    ("--config.optim.optimizer=lion", "no checkpoint in"),
    ("--config.model.d_model=128", "holds a run of another model"),
    ("--config.data.eval_split=nosuch", "split 'nosuch' of default corpus"),
    ("--config.keep_checkpoints=0", "config.keep_checkpoints must be a positive integer, got 0"),
    ("--config.eval_steps=0", "config.eval_steps must be a positive integer or -1"),
    ("--config.checkpoint_every=0", "config.checkpoint_every must be a positive integer, got 0"),
    ("--config.optim.learning_rate=nan", "config.optim.learning_rate must be a finite number > 0, got nan"),
    ("--config.optim.learning_rate=-0.001", "config.optim.learning_rate must be a finite number > 0"),
])
def test_a_resume_that_cannot_continue_fails_in_one_line_and_changes_nothing(workdir, train, override, message):
    before = snapshot(workdir)
    assert_one_line_error(train(workdir, override, total_steps=8, check=False), message)
    assert snapshot(workdir) == before


def test_a_second_trainer_on_a_workdir_exits_at_once_naming_the_first(tmp_path, lm_command):
    workdir = tmp_path / "busy"
    first = subprocess.Popen(lm_command("lm.train", f"--workdir={workdir}", *RUN, "--config.total_steps=100000"),
                             env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (workdir / "metrics.jsonl").exists():
            assert first.poll() is None and time.time() < deadline, "the first trainer did not start"
            time.sleep(0.2)
        config_json = (workdir / "config.json").read_bytes()
        started = time.time()
        second = subprocess.run(lm_command("lm.train", f"--workdir={workdir}", *RUN, "--config.total_steps=100000"),
                                env=environment(), capture_output=True, text=True, timeout=120)
        assert time.time() - started < 10  # The acceptance bound, interpreter start included (about 3 s here).
        assert_one_line_error(second, f"is in use by lm.train pid {first.pid} on host")
        assert first.poll() is None, "the first trainer kept running"
        # The first run keeps writing checkpoints and metrics; the second wrote nothing.
        assert (workdir / "config.json").read_bytes() == config_json
        assert f"lm.train pid {first.pid} on host" in (workdir / "lock").read_text()
    finally:
        first.kill()
        first.wait()


# ---------------------------------------------------------------------------------------------------------------
# Damaged checkpoints.


# Evaluate reads only the parameters, so for it every array file goes; the largest alone holds optimizer state.
EVALUATE_DAMAGE = ["truncated array files", "missing array files", "missing metadata", "emptied step directory"]
RESUME_DAMAGE = ["truncated array files", "missing array file", "emptied step directory", "truncated data state"]


def damage(workdir, how, step=6):
    step_dir = os.path.join(workdir, "checkpoints", str(step))
    arrays = sorted(glob.glob(f"{step_dir}/state/ocdbt.process_0/d/*"))
    assert arrays, f"no array files under {step_dir}: the checkpoint layout changed"
    if how == "truncated array files":
        for path in arrays:
            os.truncate(path, min(100, os.path.getsize(path)))
    elif how == "missing array file":
        os.remove(max(arrays, key=os.path.getsize))
    elif how == "missing array files":
        for path in arrays:
            os.remove(path)
    elif how == "missing metadata":
        os.remove(f"{step_dir}/state/_METADATA")
    elif how == "emptied step directory":
        for name in os.listdir(step_dir):
            path = os.path.join(step_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    elif how == "truncated data state":
        os.truncate(f"{step_dir}/data/process_0-of-1.json", 10)


@pytest.mark.parametrize("how", EVALUATE_DAMAGE)
def test_evaluate_falls_back_past_a_damaged_latest_checkpoint(workdir, run_lm, how):
    damage(workdir, how)
    before = snapshot(workdir)
    result = run_lm("lm.evaluate", f"--workdir={workdir}", "--config.eval_steps=1")
    assert "step 4: loss" in result.stdout
    assert "checkpoint 6 in" in result.stderr and "cannot be read" in result.stderr
    assert snapshot(workdir) == {**before, "eval_4.json": snapshot(workdir)["eval_4.json"]}
    assert_one_line_error(run_lm("lm.evaluate", f"--workdir={workdir}", "--step=6", check=False),
                          "no checkpoint in")


@pytest.mark.parametrize("how", RESUME_DAMAGE)
def test_a_run_resumes_past_a_damaged_checkpoint_and_ends_bitwise_equal(finished_run, train, tmp_path, how):
    """The finished 6-step run is the uninterrupted run; a copy with checkpoint 6 damaged trains steps 5-6 again."""
    workdir = tmp_path / "workdir"
    shutil.copytree(finished_run, workdir)
    damage(workdir, how)
    damaged_bytes = snapshot(os.path.join(workdir, "checkpoints", "6"))
    result = train(workdir)
    assert "resumed from step 4" in result.stdout and "checkpoint 6 in" in result.stderr
    # Moved aside with every byte; the run then saved step 6 again, equal to the uninterrupted run's.
    assert snapshot(os.path.join(workdir, "checkpoints_damaged", "6")) == damaged_bytes
    assert losses(workdir) == losses(finished_run)
    jax_tree_equal(final_params(workdir, 6), final_params(finished_run, 6))


def jax_tree_equal(a, b):
    import jax

    jax.tree.map(np.testing.assert_array_equal, a, b)


# ---------------------------------------------------------------------------------------------------------------
# Signals and crashes.


def start_until_step(lm_command, workdir, step, *extra):
    process = subprocess.Popen(lm_command("lm.train", f"--workdir={workdir}", *RUN, *extra), env=environment(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while max(losses(workdir), default=0) < step if (workdir / "metrics.jsonl").exists() else True:
        assert process.poll() is None and time.time() < deadline, "the trainer did not get there"
        time.sleep(0.1)
    return process


def test_ctrl_c_saves_the_current_step_and_exits_zero(tmp_path, lm_command):
    workdir = tmp_path / "interrupted"
    process = start_until_step(lm_command, workdir, 3, "--config.total_steps=100000")
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    saved = [int(name) for name in os.listdir(workdir / "checkpoints") if name.isdigit()]
    assert f"SIGINT: saved a checkpoint at step {max(saved)}, exiting" in stdout


def test_a_second_ctrl_c_exits_at_once(tmp_path, lm_command):
    workdir = tmp_path / "interrupted_twice"
    process = subprocess.Popen(lm_command("lm.train", f"--workdir={workdir}", *RUN, "--config.total_steps=100000"),
                               env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # The first during the set-up (the handlers are in place, the first step is seconds away), the second once the
    # first was handled (two at once would arrive as one).
    for line in process.stdout:
        if line.startswith("parameters:"):
            process.send_signal(signal.SIGINT)
        if "SIGINT: saving a checkpoint after this step" in line:
            process.send_signal(signal.SIGINT)
            break
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and stderr.strip().splitlines()[-1] == "error: interrupted"
    assert "Traceback" not in stderr
    assert not os.path.exists(workdir / "checkpoints" / "1"), "nothing saved"


def test_a_torn_last_metrics_line_is_dropped_on_resume(workdir, train):
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')
    train(workdir, total_steps=8)
    assert sorted(losses(workdir)) == list(range(1, 9))


def test_an_unexpected_error_mid_run_saves_the_last_step_first(finished_run, train, tmp_path):
    """A crash inside the loop (here an injected RuntimeError as step 4 starts, between two checkpoints) saves step 3
    before the traceback; the restart resumes there and ends bitwise equal to the uninterrupted run."""
    workdir = tmp_path / "crashed"
    crashed = train(workdir, "--config.checkpoint_every=100", "--debug_fail_at_step=4", check=False)
    assert crashed.returncode == 1 and "injected failure at step 4" in crashed.stderr
    assert "Traceback" in crashed.stderr  # A programming error keeps its traceback.
    assert "saved a checkpoint at step 3 before stopping on the error below" in crashed.stdout
    assert "resumed from step 3" in train(workdir).stdout
    assert losses(workdir) == losses(finished_run)
    jax_tree_equal(final_params(workdir, 6), final_params(finished_run, 6))


def test_keeping_one_checkpoint_never_loses_the_one_a_run_resumed_from(workdir, train):
    """With keep_checkpoints=1 a resumed run is killed while saving its next checkpoint: the one it resumed from
    is still there and readable, and the restart resumes from it or from the new one if that one was committed."""
    killed = train(workdir, "--config.keep_checkpoints=1", "--debug_kill_after_save_step=8", total_steps=10,
                   check=False)
    assert killed.returncode == -signal.SIGKILL
    kept = sorted(int(name) for name in os.listdir(workdir / "checkpoints") if name.isdigit())
    assert kept and kept[-1] in (6, 8), kept
    for step in kept:
        ocp.PyTreeCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))
    assert f"resumed from step {kept[-1]}" in train(workdir, "--config.keep_checkpoints=1", total_steps=10).stdout
    assert sorted(name for name in os.listdir(workdir / "checkpoints") if name.isdigit()) == ["10"]


def test_kill_9_at_20_random_moments_still_ends_bitwise_equal_and_leaves_no_unreadable_checkpoint(
        tmp_path, lm_command, train):
    """Half of the kills land during start-up (restore, data, compile), half in the loop at a random moment after a
    new step was logged, where a checkpoint is written every second step (so many land during a save).

    The uninterrupted run and the final resume save only at their last step: how often a run saves changes none of
    its numbers, saving every second step would be most of their time, and the checkpoints kept at the end (the last
    three) are then, but for the final one, the killed runs' own, which the end checks all read."""
    total = 200  # More than 10 kills' worth of steps: every kill finds the run still going.
    extra = [f"--config.eval_every={total}"]
    save_at_the_end = [*extra, f"--config.checkpoint_every={total}"]
    reference = tmp_path / "reference"
    train(reference, *save_at_the_end, total_steps=total)
    workdir = tmp_path / "killed"
    rng = random.Random(0)
    for round_ in range(20):
        log = tmp_path / f"round_{round_}.log"
        with open(log, "w") as stdout:
            process = subprocess.Popen(lm_command("lm.train", f"--workdir={workdir}", *RUN, *extra,
                                                  f"--config.total_steps={total}"),
                                       env=environment(), stdout=stdout, stderr=subprocess.STDOUT)
        try:
            if round_ % 2 == 0:
                time.sleep(rng.uniform(0.5, 6.0))
            else:
                wait_for_a_new_step(process, workdir, log)
                time.sleep(rng.uniform(0.0, 1.2))
            assert process.poll() is None, log.read_text()[-2000:]
        finally:
            process.kill()  # SIGKILL: no handler runs.
            process.wait()
    train(workdir, *save_at_the_end, total_steps=total)
    assert losses(workdir) == losses(reference)
    jax_tree_equal(final_params(workdir, total), final_params(reference, total))
    for step_dir in glob.glob(os.path.join(workdir, "checkpoints", "*")):
        if os.path.basename(step_dir).isdigit():
            ocp.PyTreeCheckpointer().restore(os.path.join(step_dir, "state"))  # Every kept checkpoint reads.
    assert not os.path.exists(os.path.join(workdir, "checkpoints_damaged"))


def wait_for_a_new_step(process, workdir, log):
    """Returns once `process` logged a training step of its own (its loop runs)."""
    deadline = time.time() + 300
    while True:
        assert process.poll() is None and time.time() < deadline, log.read_text()[-2000:]
        text = log.read_text()
        if "MFU against" in text:  # The loop started; steps logged from now on are this process's.
            resumed = int(text.split("resumed from step ")[1].split()[0]) if "resumed from step " in text else 0
            try:
                if max(losses(workdir), default=0) > resumed:
                    return
            except (FileNotFoundError, json.JSONDecodeError):  # Not written yet, or a line being appended now.
                pass
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------------------------
# Bad input anywhere: one line, exit 1, no traceback.


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "no_get_config.py").write_text("x = 1\n")
    (root / "broken.py").write_text("def get_config(:\n")
    (root / "a_file").write_text("not a directory\n")
    (root / "not_a_model.model").write_bytes(b"garbage")
    texts = root / "texts"
    texts.mkdir()
    (texts / "good.txt").write_text("hello world\n" * 50)
    (texts / "corrupt.txt.gz").write_bytes(gzip.compress(b"hello world\n" * 500)[:40])
    return root


TINY = ["--config=configs/tiny.py", "--workdir=W"]
CASES = [
    ("lm.train", ["--config=configs/nope.py", "--workdir=W"], "--config=configs/nope.py: OSError"),
    ("lm.train", ["--config=B/no_get_config.py", "--workdir=W"], "has no attribute 'get_config'"),
    ("lm.train", ["--config=B/broken.py", "--workdir=W"], "B/broken.py:1: invalid syntax"),
    ("lm.train", [*TINY, "--config.modle.num_layers=2"],
     "an override names no config field: 'modle'"),
    ("lm.train", [*TINY, "--config.model.num_layerz=2"],
     "an override names no config field: 'num_layerz'"),
    ("lm.train", [*TINY, "--config.log_every=0"],
     "config.log_every must be a positive integer, got 0"),
    ("lm.train", ["--config=configs/tiny.py", "--workdir=B/a_file"], "--workdir=B/a_file is a file, not a directory"),
    ("lm.train", [*TINY, "--profile_steps=abc"],
     "--profile_steps='abc' must be START:STOP"),
    ("lm.train", [*TINY, "--config.data.tokenizer.path=B/missing.model"],
     "config.data.tokenizer.path='B/missing.model': no such tokenizer file"),
    ("lm.train", [*TINY, "--config.data.tokenizer.path=B/not_a_model.model"],
     "is not a SentencePiece model"),
    ("lm.train", [*TINY, "--config.data.source=files",
                  "--config.data.files=B/texts/*"], "corrupt.txt.gz: cannot be read"),
    ("lm.data.tokenizer_training", ["--config=configs/tiny.py", "--config.data.source=synthetic"],
     "config.data.source='synthetic' has no documents"),
    ("lm.evaluate", ["--workdir=B/a_file"], "workdir 'B/a_file' is a file, not a directory"),
    ("lm.generate", ["--workdir=B/a_file", "--prompt=x"], "workdir 'B/a_file' is a file, not a directory"),
    ("lm.preflight", ["--config=configs/tiny.py", "--devices=0"], "--devices=0 must be a positive number of devices"),
    ("lm.preflight", ["--config=configs/tiny.py", "--devices=-8"], "--devices=-8 must be a positive number"),
]


@pytest.mark.parametrize("program,args,message", CASES, ids=[f"{p} {' '.join(a[1:])}" for p, a, _ in CASES])
def test_bad_input_gets_one_line(bad_inputs, tmp_path, run_lm, program, args, message):
    workdir = str(tmp_path / "new")
    replace = lambda text: text.replace("B/", f"{bad_inputs}/").replace("=W", f"={workdir}")
    result = run_lm(program, *map(replace, args), check=False)
    assert_one_line_error(result, replace(message))
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))


def test_corrupt_config_json_is_one_line_and_verbose_shows_the_traceback(workdir, run_lm):
    (workdir / "config.json").write_text('{"model": {')
    result = run_lm("lm.evaluate", f"--workdir={workdir}", check=False)
    assert_one_line_error(result, "config.json is not valid JSON")
    verbose = run_lm("lm.evaluate", f"--workdir={workdir}", "--verbose", check=False)
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr


def test_generate_refuses_more_tokens_than_the_model_has_positions(finished_run, run_lm):
    result = run_lm("lm.generate", f"--workdir={finished_run}", "--prompt=x", "--max_new_tokens=100000", check=False)
    assert_one_line_error(result, "exceeds the model's config.model.max_seq_len=")
