"""The notebooks in `notebooks/` are stored without outputs and execute top to bottom on the CPU without errors.

Each notebook runs in a fresh Jupyter kernel of the Python running pytest (a `python3` kernelspec written to a
temporary directory, so a user-level `python3` kernel pointing at another environment is never picked up), from a
temporary copy of `notebooks/`, so nothing is written into the repository. The notebooks find the repository root
themselves (upward from the working directory, else the checkout `lm` is installed from).

    python tests/test_notebooks.py --write_images   # re-executes them and refreshes notebooks/images/*.png
    python tests/test_notebooks.py --clear_outputs  # strips outputs and execution counts before a commit

`--write_images` is how the README pictures are made: it saves the figures of the cells tagged `readme-image` (the
file name is in the cell's `metadata.readme_image`) from a real execution.

The test may set a notebook's parameters (`TEST_PARAMETERS`): a cell assigning them is inserted after the notebook's
cell tagged `parameters` (papermill's convention), so the test runs every cell as a reader would, on less work.
`--write_images` executes the notebooks as stored.
"""

from __future__ import annotations

import base64
import json
import os
import pathlib
import re
import shutil
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
NOTEBOOK_NAMES = ("01_model_tour.ipynb", "02_restore_and_eval.ipynb", "03_finetune.ipynb")
CELL_TIMEOUT_S = 600
# Parameters the test sets, by notebook. 02's short training run (300 steps on 8 simulated devices) was most of the
# notebook's time; 20 steps still train, evaluate, checkpoint and draw everything the later cells read.
TEST_PARAMETERS = {"02_restore_and_eval.ipynb": {"TRAIN_STEPS": 20}}


def _kernel_manager(kernel_dir: pathlib.Path):
    """A kernel manager for a `python3` kernel that runs `sys.executable` (the interpreter running the tests)."""
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    write_kernel_spec(kernel_dir / "python3")
    spec_manager = KernelSpecManager(kernel_dirs=[str(kernel_dir)])
    return KernelManager(kernel_name="python3", kernel_spec_manager=spec_manager)


def set_parameters(notebook, parameters: dict) -> None:
    """Inserts a cell assigning `parameters` after the notebook's cell tagged `parameters`, which must assign each."""
    import nbformat

    tagged = [index for index, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"expected one cell tagged 'parameters', found {len(tagged)}"
    for name in parameters:
        assert re.search(rf"^{name} = ", notebook.cells[tagged[0]].source, re.MULTILINE), (
            f"the parameters cell assigns no {name}")
    source = "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
    notebook.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))


def execute_notebook(name: str, scratch: pathlib.Path, parameters: dict | None = None):
    """Executes a copy of `notebooks/NAME` in `scratch`, with `parameters` set (`set_parameters`) if given; returns
    the executed notebook and the wall time in seconds.

    Raises `nbclient.exceptions.CellExecutionError` naming the cell and the traceback if a cell fails.
    """
    import nbclient
    import nbformat

    work = scratch / "notebooks"
    work.mkdir(parents=True, exist_ok=True)
    shutil.copy(NOTEBOOKS / name, work / name)
    notebook = nbformat.read(work / name, as_version=4)
    if parameters:
        set_parameters(notebook, parameters)
    kernel_dir = scratch / "kernels"
    kernel_dir.mkdir(exist_ok=True)
    kernel = _kernel_manager(kernel_dir)
    client = nbclient.NotebookClient(
        notebook, km=kernel, timeout=CELL_TIMEOUT_S, startup_timeout=120, resources={"metadata": {"path": str(work)}})
    temp = scratch / "tmp"  # The notebooks' temporary directories (02's training run) go here and are removed.
    temp.mkdir(exist_ok=True)
    # Without the test session's XLA_FLAGS (conftest.FAST_COMPILE would slow the notebooks' training runs): each
    # notebook sets its own device count, and compiles as a reader's would.
    env = {name: value for name, value in os.environ.items() if name != "XLA_FLAGS"}
    start = time.perf_counter()
    try:
        client.execute(env={**env, "TMPDIR": str(temp)})
    finally:
        # nbclient leaves a kernel it was given running: without this, each notebook's kernel (and its JAX thread
        # pools) would live, and take CPU, until the whole test session ends.
        if kernel.has_kernel:
            kernel.shutdown_kernel(now=True)
    return notebook, time.perf_counter() - start


def png_outputs(notebook) -> list[tuple[int, bytes]]:
    """(cell index, PNG bytes) of every image the executed notebook displayed."""
    return [(index, base64.b64decode(output["data"]["image/png"]))
            for index, cell in enumerate(notebook.cells) if cell.cell_type == "code"
            for output in cell.get("outputs", []) if "image/png" in output.get("data", {})]


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_notebook_is_stored_without_outputs(name):
    notebook = json.loads((NOTEBOOKS / name).read_text())
    code_cells = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code_cells, f"{name} has no code cells"
    dirty = [index for index, cell in enumerate(notebook["cells"])
             if cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, f"{name}: cells {dirty} have outputs or execution counts; clear them before committing"
    first = "".join(code_cells[0]["source"])
    assert "--xla_force_host_platform_device_count=" in first and "JAX_PLATFORMS" in first, (
        f"{name}: the first code cell must set XLA_FLAGS and JAX_PLATFORMS before jax is imported")


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_notebook_executes_without_errors_and_draws_figures(name, tmp_path):
    # A failing cell raises CellExecutionError here.
    notebook, seconds = execute_notebook(name, tmp_path, TEST_PARAMETERS.get(name))
    print(f"{name}: executed in {seconds:.1f} s")
    errors = [(index, output.get("ename"), output.get("evalue"))
              for index, cell in enumerate(notebook.cells) if cell.cell_type == "code"
              for output in cell.get("outputs", []) if output.get("output_type") == "error"]
    assert not errors, f"{name}: cells raised {errors}"
    images = png_outputs(notebook)
    assert images, f"{name} displayed no matplotlib figure"
    assert all(png.startswith(b"\x89PNG") and len(png) > 5_000 for _, png in images), f"{name}: empty figures"
    if name in PRINTED_RESULTS:
        PRINTED_RESULTS[name](printed_text(notebook))


def printed_text(notebook) -> str:
    """Everything the executed notebook's cells printed."""
    return "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for output in cell.get("outputs", []) if output.get("output_type") == "stream")


def _lora_learned_the_task(text: str) -> None:
    """03 is the fine-tuning issue's learning test: on held-out prompts of a task built in the notebook (reverse
    three digits), greedy decoding of the pretrained base is below 10% exact, after LoRA at least 90%."""
    match = re.search(r"held-out exact match: base (\d+)% -> LoRA (\d+)%", text)
    assert match, "03_finetune.ipynb printed no held-out exact match"
    base, lora = (int(value) for value in match.groups())
    print(f"held-out exact match: base {base}%, LoRA {lora}%")
    assert base < 10 and lora >= 90, (base, lora)


# What a notebook must print, beyond running: a check of the printed text, by notebook.
PRINTED_RESULTS = {"03_finetune.ipynb": _lora_learned_the_task}


def _write_readme_images(scratch: pathlib.Path) -> None:
    """Executes every notebook and writes the figures of cells tagged `readme-image` to notebooks/images/."""
    (NOTEBOOKS / "images").mkdir(exist_ok=True)
    for name in NOTEBOOK_NAMES:
        notebook, seconds = execute_notebook(name, scratch / name.removesuffix(".ipynb"))
        print(f"{name}: executed in {seconds:.1f} s")
        for index, png in png_outputs(notebook):
            target = notebook.cells[index].metadata.get("readme_image")
            if target:
                (NOTEBOOKS / "images" / target).write_bytes(png)
                print(f"  wrote notebooks/images/{target} ({len(png):,} bytes) from cell {index}")


def _clear_outputs() -> None:
    import nbformat

    for name in NOTEBOOK_NAMES:
        notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                cell.outputs, cell.execution_count = [], None
        nbformat.write(notebook, NOTEBOOKS / name)
        print(f"cleared notebooks/{name}")


if __name__ == "__main__":
    import tempfile

    if sys.argv[1:] == ["--write_images"]:
        with tempfile.TemporaryDirectory() as scratch_dir:
            _write_readme_images(pathlib.Path(scratch_dir))
    elif sys.argv[1:] == ["--clear_outputs"]:
        _clear_outputs()
    else:
        raise SystemExit(f"usage: python {os.path.relpath(__file__)} --write_images | --clear_outputs")
