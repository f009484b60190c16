"""The package's floors (docs/architecture.md): who may import whom, no import cycles, one error base class, one CLI
shell that prints every lm error as one line."""

import ast
import importlib
import inspect
import os
import pkgutil
import subprocess
import sys

import pytest

import lm
from lm import errors

from conftest import REPO, environment

TRAINING_MODULES = ("lm.train", "lm.train_step", "lm.optim")


def lm_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(lm.__path__, "lm."))


def imported_lm_modules(name: str) -> set[str]:
    """The lm modules `name` imports anywhere in its source (module level, inside functions, under __main__)."""
    tree = ast.parse(open(importlib.util.find_spec(name).origin).read())
    found = set()
    for node in ast.walk(tree):  # lm uses absolute imports only.
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{name}: relative import"
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    modules = set(lm_modules()) | {"lm"}
    return {m for m in found if m in modules and m != name}


def test_inference_imports_no_training_code_and_sampling_no_tensorflow():
    script = """
import sys
import lm.generate
assert "tensorflow" not in sys.modules, "import lm.generate imported TensorFlow"
import lm.checkpoint, lm.evaluate
print(sorted(m for m in sys.modules if m in {"lm.train", "lm.train_step", "lm.optim"}))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=environment(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


def test_the_gpu_check_imports_only_what_the_accelerator_image_has():
    """The device image has JAX, flax, optax, orbax, sentencepiece, but neither TensorFlow nor grain (the data
    pipeline's), nor lm's tokenizers' libraries: launch/gpu_check.sh carries only an ml_collections wheel."""
    script = """
import sys
import lm.bench.gpu
print(sorted(m for m in ("tensorflow", "tensorflow_datasets", "grain", "tokenizers", "safetensors") if m in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=environment(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("module", ["lm.checkpoint", "lm.evaluate", "lm.generate"])
def test_inference_modules_name_no_training_module(module):
    assert not imported_lm_modules(module) & set(TRAINING_MODULES)


def test_no_import_cycle_in_the_package():
    graph = {name: imported_lm_modules(name) for name in lm_modules()}
    # Depth-first search; a module reached again while still on the path closes a cycle.
    state, path = {}, []

    def visit(name):
        state[name] = "open"
        path.append(name)
        for dependency in sorted(graph.get(name, ())):
            if state.get(dependency) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(dependency):] + [dependency]))
            if dependency not in state:
                visit(dependency)
        path.pop()
        state[name] = "done"

    for name in graph:
        if name not in state:
            visit(name)


def test_every_lm_exception_derives_from_the_one_base_class():
    classes = {}
    for name in lm_modules():
        if name.startswith("lm.bench."):
            continue  # Benchmarks are programs that define flags on import; they define no exceptions.
        for _, cls in inspect.getmembers(importlib.import_module(name), inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__.startswith("lm"):
                classes[f"{cls.__module__}.{cls.__qualname__}"] = cls
    assert len(classes) >= 10
    assert all(issubclass(cls, errors.LmError) for cls in classes.values()), sorted(
        name for name, cls in classes.items() if not issubclass(cls, errors.LmError))


@pytest.mark.parametrize("command,message", [
    (["lm.train", "--config=configs/tiny.py", "--workdir=WORKDIR", "--config.model.num_heads=3"],
     "error: config.model.d_model=256 must be divisible by config.model.num_heads=3"),
    (["lm.evaluate", "--workdir=WORKDIR/none"], "error: WORKDIR/none/config.json does not exist"),
    (["lm.generate", "--workdir=WORKDIR", "--prompt=x"], "error: WORKDIR has no complete checkpoints"),
    (["lm.preflight", "--config=configs/tiny.py", "--mesh=data=2,gpus=4"], "error: --mesh='data=2,gpus=4': 'gpus=4'"),
    (["lm.data.tokenizer_training", "--config=configs/tiny.py", "--config.data.source=files"],
     "error: config.data.source='files' needs config.data.files"),
    (["lm.harness", "--model", "lm", "--model_args", "workdir=WORKDIR,dtype=float16", "--tasks", "lm_arithmetic"],
     "error: --model_args: lm takes workdir, step, max_length, max_gen_toks and seed, not dtype"),
])
def test_every_program_prints_an_lm_error_as_one_line_and_exits_1(tmp_path, command, message):
    workdir = str(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    args = [a.replace("WORKDIR", workdir) for a in command]
    result = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=environment(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(message.replace("WORKDIR", workdir)), result.stderr


def test_module_docstrings_point_to_the_axis_legend():
    legend = lm.__doc__
    for letters in ("b  batch", "t  positions", "x  tokens", "l  layers", "m  micro-batches"):
        assert letters in legend
    assert os.path.isfile(os.path.join(REPO, "docs", "architecture.md"))
