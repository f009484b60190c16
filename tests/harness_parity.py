"""The README's harness parity table: lm's harness model against the harness's `hf` backend on the same tiny random
Llama (tests/test_harness.py's), on lm's three shipped tasks, every request compared.

    python tests/harness_parity.py

Per task: the requests, the largest difference of a response (log-likelihood in nats; generations compared as
text), whether every `is_greedy` and every generated text is the same, and each side's score.
"""

import os
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

import test_harness  # noqa: E402
from lm.harness import model as harness_model  # noqa: E402

SCORES = {"lm_python_choice": "acc,none", "lm_python_perplexity": "byte_perplexity,none",
          "lm_arithmetic": "exact_match,strip"}


def main() -> None:
    with tempfile.TemporaryDirectory() as root:
        hf_dir, workdir = test_harness.save_imported(root)
        tasks = test_harness.shipped_tasks()
        length = test_harness.MAX_LENGTH
        hf = test_harness.run_tasks(HFLM(pretrained=hf_dir, batch_size=1, max_length=length, device="cpu",
                                         dtype="float32"), tasks)
        ours = test_harness.run_tasks(harness_model.HarnessModel(workdir, batch_size=32, max_length=length), tasks)
    print(f"max_length {length}; hf batch 1, lm batch 32\n")
    print("| task | requests | largest difference | is_greedy / texts | score | hf | lm |")
    print("|---|---|---|---|---|---|---|")
    for task, score in SCORES.items():
        got, expected = test_harness.responses(ours, task), test_harness.responses(hf, task)
        if task == "lm_arithmetic":
            difference, same = "-", "identical" if got == expected else "DIFFERENT"
        elif task == "lm_python_choice":
            difference = f"{np.max(np.abs([a[0] - b[0] for a, b in zip(got, expected)])):.1e}"
            same = "identical" if [a[1] for a in got] == [b[1] for b in expected] else "DIFFERENT"
        else:
            difference, same = f"{np.max(np.abs(np.subtract(got, expected))):.1e}", "-"
        print(f"| {task} | {len(got)} | {difference} | {same} | {score.split(',')[0]} | "
              f"{hf['results'][task][score]:.6g} | {ours['results'][task][score]:.6g} |", flush=True)


if __name__ == "__main__":
    main()
