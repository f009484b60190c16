"""Norms and position encodings side by side: the same small model trained the same number of steps on the default
corpus with one field changed, and the held-out loss each reaches.

    python -m lm.bench.ablation --root=/tmp/ablation [--steps=300] [--config.field=value ...]

Variants: `config.model.norm` rmsnorm (the default), layernorm, scalenorm; `config.model.position_embedding` rope (the
default), learned, sinusoidal, relative (T5's bias), alibi, none. Every run starts from the same seed and reads the same
batches (`lm.train.train` in this process, one workdir each under `--root`); the table prints the final evaluation
loss over the whole validation split, its perplexity, and the training tokens per second of each, measured in this
run. The model is `configs/tiny.py` shrunk to 2 layers of width 128 so the whole table takes minutes on a CPU.
"""

from __future__ import annotations

import json
import math
import os

from absl import flags
from ml_collections import config_flags

from lm import cli
from lm import config as lm_config
from lm import train as train_lib

VARIANTS = (
    ("norm", "rmsnorm"), ("norm", "layernorm"), ("norm", "scalenorm"),
    ("position_embedding", "rope"), ("position_embedding", "learned"), ("position_embedding", "sinusoidal"),
    ("position_embedding", "relative"), ("position_embedding", "alibi"), ("position_embedding", "none"),
)

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "The base config every variant changes.")
_ROOT = flags.DEFINE_string("root", None, "Directory for the runs' workdirs (one per variant).", required=True)
_STEPS = flags.DEFINE_integer("steps", 300, "Training steps of every run.")


def ablation_config(base, field: str, value: str, steps: int):
    """`base` with `config.model.<field> = value`, shrunk and set to train `steps` steps and evaluate at the end."""
    config = base.copy_and_resolve_references()
    config.model.update(num_layers=2, d_model=128, num_heads=4, num_kv_heads=2, mlp_dim=384)
    config.model[field] = value
    config.update(total_steps=steps, eval_every=steps, checkpoint_every=steps, eval_steps=-1, log_every=10)
    config.optim.warmup_steps = min(config.optim.warmup_steps, steps // 10)
    return lm_config.validate(config)


def final_metrics(workdir: str) -> dict[str, float]:
    """The last evaluation loss and the mean training tokens/s of a run's `metrics.jsonl`."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    speeds = [line["tokens_per_sec"] for line in lines if "tokens_per_sec" in line][1:]  # The first compiles.
    return {"eval_loss": [line["eval_loss"] for line in lines if "eval_loss" in line][-1],
            "tokens_per_sec": sum(speeds) / max(len(speeds), 1)}


def main(argv):
    del argv
    results = []
    for field, value in VARIANTS:
        workdir = os.path.join(_ROOT.value, f"{field}={value}")
        train_lib.train(ablation_config(_CONFIG.value, field, value, _STEPS.value), workdir)
        results.append((field, value, final_metrics(workdir)))
    print(f"{_STEPS.value} steps of a 2-layer, d_model 128 model on the default corpus; eval loss over the whole "
          f"validation split")
    print(f"| {'field':<18} | {'value':<10} | eval loss | perplexity | train tokens/s |")
    print(f"|{'-' * 20}|{'-' * 12}|-----------|------------|----------------|")
    for field, value, metrics in results:
        print(f"| {field:<18} | {value:<10} | {metrics['eval_loss']:9.4f} | {math.exp(metrics['eval_loss']):10.1f} | "
              f"{metrics['tokens_per_sec']:14,.0f} |")


if __name__ == "__main__":
    cli.run(main)
