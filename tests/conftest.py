"""Test setup: 8 simulated CPU devices, set before JAX is imported anywhere, so every test can build real meshes; and
the fixtures several modules share: one tokenizer/dataset cache, a runner for lm's programs (compiled for compile
speed, `FAST_COMPILE`), one small trained run.
"""

import io
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import sentencepiece

# XLA's CPU backend without LLVM's optimisations, for the lm programs the tests start (`environment`): they run tiny
# models for a few steps, so compiling is most of their time, and at level 0 it is 2-4x faster while a step runs about
# 1.8x slower (the same computation, less optimised machine code). Those programs are compared with each other only.
# The tests' own computations keep the default level: the fused code of level 0 rounds differently, enough to move a
# rarely updated Adam parameter past test_sharding's one-device tolerance. The notebooks run as a reader's would.
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# configs/tiny.py shrunk so a run takes seconds; 4 heads / 2 KV heads so a (data, fsdp, tensor) = (2, 2, 2) mesh
# splits heads too.
SMALL_MODEL = [
    "--config=configs/tiny.py", "--config.model.num_layers=2", "--config.model.d_model=64",
    "--config.model.num_heads=4", "--config.model.num_kv_heads=2", "--config.model.mlp_dim=128",
    "--config.data.seq_len=32", "--config.data.batch_size=8",
]

# What the fine-tuning tests' tokenizers are trained on: the words of their records.
RECORDS_CORPUS = "\n".join(["User: hi there, what is 2+2?", "Assistant: hello, it is 4.", "System: Be brief.",
                            "reverse: a b c\nanswer: c b a", "Q: 2+2?\nA: 4"] * 20)


# JAX's persistent compilation cache for the lm programs the tests start, fresh for each session: the tests start
# the same small runs again and again (restarts after kills, resumes), and a start that finds its executables here
# skips their compilation (about 10 s of a 15 s start). A cached executable is the one compiled before, so results
# stay bitwise the same; an entry cut short by a test's SIGKILL is reported by JAX and compiled again.
COMPILATION_CACHE = tempfile.mkdtemp(prefix="lm_tests_jax_cache_")


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(COMPILATION_CACHE, ignore_errors=True)


@pytest.fixture
def compilation_cache():
    """The session's compilation cache, in this process, for one test: for tests that train the same config again
    in-process (a straight run, a crashed one, its resume), whose later runs then load the executables the first
    compiled. Opt-in, not session-wide: with it every compile of a program seen before is a cache read, which tests
    that time or inspect compilation must not get."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as jax_cache

    settings = {"jax_compilation_cache_dir": COMPILATION_CACHE, "jax_persistent_cache_min_compile_time_secs": 0.0,
                "jax_persistent_cache_min_entry_size_bytes": 0}
    previous = {name: getattr(jax.config, name) for name in settings}
    for name, value in settings.items():
        jax.config.update(name, value)
    jax_cache.reset_cache()  # JAX decides whether to use the cache once, at the first compile after a reset.
    try:
        yield
    finally:
        for name, value in previous.items():
            jax.config.update(name, value)
        jax_cache.reset_cache()


def environment(devices: int = 1) -> dict[str, str]:
    """The environment of an lm program started by a test: `devices` simulated CPU devices compiled for compile speed
    (`FAST_COMPILE`), the session's compilation cache."""
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}",
            "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": COMPILATION_CACHE,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


@pytest.fixture(scope="session")
def lm_cache(tmp_path_factory) -> str:
    """One `config.data.cache_dir` for the session: the default corpus is prepared and its tokenizer trained once."""
    return str(tmp_path_factory.mktemp("lm_cache"))


@pytest.fixture(scope="session")
def lm_command(lm_cache):
    """`lm_command(module, *args)`: the command line of `python -m module args`, with the session's cache
    directory added to every program given a `--config=`."""

    def command(module: str, *args: str) -> list[str]:
        if any(a.startswith("--config=") for a in args):
            args = (*args, f"--config.data.cache_dir={lm_cache}")
        return [sys.executable, "-m", module, *args]

    return command


@pytest.fixture(scope="session")
def run_lm(lm_command):
    """`run_lm(module, *args, devices=1, check=True)`: runs `python -m module args` as a user would, returns the
    `CompletedProcess` (text output); with `check`, a failure raises with the program's output."""

    def run(module: str, *args: str, devices: int = 1, check: bool = True, timeout: int = 600):
        result = subprocess.run(lm_command(module, *args), env=environment(devices), cwd=REPO, capture_output=True,
                                text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(
                f"{module} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    return run


@pytest.fixture(scope="session")
def small_run(run_lm, tmp_path_factory) -> str:
    """The workdir of a 4-step run of the small model on the default corpus, trained on a (2, 2, 2) mesh of 8
    devices: checkpoints at steps 2 and 4, a metrics line per step, evaluated (2 batches) at step 4."""
    workdir = str(tmp_path_factory.mktemp("small_run") / "workdir")
    run_lm("lm.train", f"--workdir={workdir}", *SMALL_MODEL, "--config.log_every=1", "--config.eval_every=4",
           "--config.eval_steps=2", "--config.checkpoint_every=2", "--config.total_steps=4", "--config.mesh.data=2",
           "--config.mesh.fsdp=2", "--config.mesh.tensor=2", devices=8)
    return workdir


@pytest.fixture(scope="session")
def sentencepiece_tokenizer(tmp_path_factory) -> str:
    """The path of a SentencePiece model trained as lm trains its own (`lm.data.tokenizer_training` settings), on a
    toy corpus of the fine-tuning tests' records (`RECORDS_CORPUS`)."""
    from lm import config as lm_config
    from lm.data import tokenizer_training

    settings = tokenizer_training.training_settings(lm_config.base_config())
    settings = {k: v for k, v in settings.items() if k not in ("max_chars", "sentencepiece")}
    settings["vocab_size"] = 320
    writer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(RECORDS_CORPUS.splitlines(keepends=True)),
                                            model_writer=writer, **settings)
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    path.write_bytes(writer.getvalue())
    return str(path)
