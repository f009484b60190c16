"""`python -m lm.harness`: the lm-evaluation-harness command line (`lm-eval`) with lm's model in it.

    python -m lm.harness --model lm --model_args workdir=W[,step=N] --tasks lm_python_choice,lm_arithmetic
    python -m lm.harness ls tasks

The harness's own program, flags and output, with three additions (it finds no third-party model by itself):
`lm.harness.model` is imported, which registers the model `lm`; lm's shipped tasks (`lm.harness.TASKS_DIR`) are on
the task path (a `--include_path` given is searched too, first); and after an evaluation of an `lm` model the
results are also written to `W/eval_harness_<step>.json` beside lm's perplexity results (`eval_<step>.json`).
Without the harness installed, it says how to install it (one line, exit 1).
"""

from __future__ import annotations

import functools
import os
import sys

from lm import cli
from lm import harness
from lm.errors import MissingExtraError


def _with_shipped_tasks(argv: list[str]) -> list[str]:
    """`argv` with lm's task directory added to `--include_path` (after any the user gave)."""
    for i, arg in enumerate(argv):
        if arg == "--include_path" and i + 1 < len(argv):
            return argv[:i + 1] + [f"{argv[i + 1]}{os.pathsep}{harness.TASKS_DIR}"] + argv[i + 2:]
        if arg.startswith("--include_path="):
            return argv[:i] + [f"{arg}{os.pathsep}{harness.TASKS_DIR}"] + argv[i + 1:]
    return argv + ["--include_path", harness.TASKS_DIR] if len(argv) > 2 else argv  # Not to `--help` alone.


def _saving_results(simple_evaluate):
    """`simple_evaluate` that also writes an lm model's results into its workdir (`model.save_results`)."""
    from lm.harness import model

    @functools.wraps(simple_evaluate)
    def evaluate_and_save(*args, **kwargs):
        results = simple_evaluate(*args, **kwargs)
        path = model.save_results(results)
        if path:
            print(f"lm: results written to {path}", flush=True)
        return results

    return evaluate_and_save


def main(argv: list[str]) -> None:
    try:
        import lm_eval
        from lm_eval import __main__ as harness_main

        from lm.harness import model  # noqa: F401  (registers the model "lm")
    except ImportError as error:
        if getattr(error, "name", "") and error.name.split(".")[0] == "lm_eval":
            raise MissingExtraError(f"python -m lm.harness: {harness.MISSING}") from None
        raise
    # The harness's run command imports `simple_evaluate` from the package when it runs.
    lm_eval.simple_evaluate = _saving_results(lm_eval.simple_evaluate)
    sys.argv = _with_shipped_tasks(argv)
    harness_main.cli_evaluate()


if __name__ == "__main__":
    cli.run(main, parse_flags=False)
