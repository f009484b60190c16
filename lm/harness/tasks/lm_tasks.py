"""Datasets of lm's shipped harness tasks: the JSON lines files beside this module, read without a download.

The task YAML files name these functions as `custom_dataset: !function lm_tasks.<name>`; the harness calls them
with its metadata (the model's arguments among them), which they ignore.
"""

import json
import os

import datasets

_HERE = os.path.dirname(os.path.abspath(__file__))


def _jsonl(name: str) -> datasets.DatasetDict:
    with open(os.path.join(_HERE, f"{name}.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def python_choice(**metadata) -> datasets.DatasetDict:
    return _jsonl("lm_python_choice")


def python_perplexity(**metadata) -> datasets.DatasetDict:
    return _jsonl("lm_python_perplexity")


def arithmetic(**metadata) -> datasets.DatasetDict:
    return _jsonl("lm_arithmetic")
