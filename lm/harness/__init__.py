"""lm as a model of EleutherAI's lm-evaluation-harness (`lm_eval`), and the small tasks lm ships for it.

    python -m lm.harness --model lm --model_args workdir=W[,step=N,max_length=L,max_gen_toks=G] --tasks T [--batch_size B]
        [any other flag of the harness's own `lm-eval` command]

- `lm.harness.model.HarnessModel`, registered as `lm` in the harness's model registry: scores any lm checkpoint (a
  run's own or one imported with `lm.hf`) on the harness's three request types, sharded over the mesh
  (`lm/harness/model.py`).
- `python -m lm.harness` is the harness's command line with lm's model registered, the shipped tasks on its task
  path, and the results also written to `W/eval_harness_<step>.json` (`lm/harness/__main__.py`).
- `TASKS_DIR` (`lm/harness/tasks/`): three offline tasks made by the project, JSON lines read from the package:
  `lm_python_choice` (multiple choice), `lm_python_perplexity` (rolling log-likelihood), `lm_arithmetic`
  (generation, exact match). In Python: `lm_eval.tasks.TaskManager(include_path=lm.harness.TASKS_DIR)`.

The harness is optional (`pip install 'lm[eval]'`); this package's `__init__` imports nothing of it, so
`lm.harness.TASKS_DIR` and `MISSING` work without it.
"""

from __future__ import annotations

import os

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")
SHIPPED_TASKS = ("lm_python_choice", "lm_python_perplexity", "lm_arithmetic")
MISSING = "lm-evaluation-harness is not installed: pip install 'lm[eval]' (or pip install lm_eval)"
