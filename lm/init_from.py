"""`config.init_from`: the weights a new training run starts from instead of a random initialisation.

- `""`: random initialisation (`lm.model.init`).
- An lm workdir, `DIR` or `DIR:STEP` (default: its latest checkpoint); an imported Hugging Face model
  (`python -m lm.hf import`) is one.
- A Hugging Face model directory, or a hub id (downloaded when online), read as `lm.hf` imports it.

The source decides the model: `with_source_model(config)` takes every `config.model` field from it except the
execution choices the run makes itself (`EXECUTION_FIELDS`: compute and storage dtypes, attention kernel, layer
scan, rematerialisation), and the source's tokenizer unless `config.data.tokenizer.path` names one. Only parameters
are taken: the optimizer state starts fresh and the step counter at 0. A run whose workdir already has checkpoints
resumes from them; `init_from` then only has to name the same model.

A PEFT run (`config.finetune.method` lora, prefix or loreft; `lm.peft`) keeps its source as a frozen base that
its checkpoints point to: the source must be an lm workdir (import a Hugging Face model first) whose run has no
adapters itself, and `init_from` is pinned to `ABSOLUTE_DIR:STEP`, so the adapters are always read back onto the
weights they were trained on (`lm.checkpoint.restore`). A DPO or PPO run's source is also its reference model, read
on every start, so it is pinned the same way.
"""

from __future__ import annotations

import os

import ml_collections

from lm import checkpoint
from lm import config as lm_config
from lm import peft
from lm import sharding as sharding_lib
from lm.data import tokenizer as tokenizer_lib
from lm.errors import ConfigError

EXECUTION_FIELDS = ("dtype", "param_dtype", "attention", "scan_layers", "remat_policy")


def _source(init_from: str) -> tuple[str, str, int | None]:
    """`(kind, directory, step)`: kind `lm` (a workdir) or `hf` (a Hugging Face model directory)."""
    path, step = checkpoint.workdir_and_step(init_from)
    if step is not None and os.path.isdir(path):
        return "lm", path, step
    if os.path.isfile(os.path.join(init_from, lm_config.CONFIG_FILE)) and os.path.isdir(
            os.path.join(init_from, checkpoint.CHECKPOINT_DIR)):
        return "lm", init_from, None
    from lm.hf import convert

    try:
        return "hf", convert.resolve_source(init_from), None
    except ConfigError:
        raise ConfigError(f"config.init_from={init_from!r} is neither an lm workdir (DIR or DIR:STEP, with config.json "
                          f"and checkpoints/), a Hugging Face model directory, nor a reachable hub id") from None


def with_source_model(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with the model (and, unless set, the tokenizer) of `config.init_from` (module docstring); `config`
    itself when `init_from` is empty."""
    if not config.init_from:
        return config
    kind, directory, step = _source(config.init_from)
    adapted = peft.is_peft(config)
    if adapted and kind != "lm":
        raise ConfigError(f"config.finetune.method={config.finetune.method!r} needs config.init_from to be an lm "
                          f"workdir (the frozen base its checkpoints point to); {config.init_from!r} is a Hugging Face "
                          f"model: import it first with python -m lm.hf import --hf={config.init_from} --workdir=DIR")
    if kind == "lm":
        source_config = lm_config.read_config(directory)
        if adapted and peft.is_peft(source_config):
            raise ConfigError(f"config.init_from={config.init_from!r} is a run with {source_config.finetune.method} "
                              f"adapters; a PEFT run's base must have none (export it merged and import that)")
        model = lm_config.to_dict(source_config)["model"]
    else:
        from lm.hf import architectures, convert

        hf_config = convert.read_hf_config(directory)
        model = architectures.config_from_hf(hf_config, os.path.join(directory, "config.json"))
    resolved = config.copy_and_resolve_references()
    resolved.model.update({k: v for k, v in model.items() if k not in EXECUTION_FIELDS})
    if not resolved.data.tokenizer.path and tokenizer_lib.in_workdir(directory):
        resolved.data.tokenizer.path = directory
    if kind == "hf":
        architectures.check_sliding_window(hf_config, resolved, os.path.join(directory, "config.json"))
    if adapted or (config.finetune.objective in ("dpo", "ppo") and kind == "lm"):  # Read again every start.
        step = checkpoint.kept_steps(directory)[-1] if step is None else step
        resolved.init_from = f"{os.path.abspath(directory)}:{step}"
    return lm_config.validate(resolved)


def initial_params(config: ml_collections.ConfigDict, shardings):
    """The parameters of `config.init_from`, in `config.model.param_dtype`, placed on `shardings.mesh` by the
    config's rules: the base model's tree, without adapters or a scalar head (`lm.peft.base_config`), which a run
    adds itself (a PEFT run's adapters; `Training.state_from`'s new head)."""
    kind, directory, step = _source(config.init_from)
    base = peft.base_config(config)
    if kind == "lm":
        return checkpoint.restore(directory, step, shardings.mesh, config=base).params
    from lm.hf import weights

    return weights.load_params(weights.SafetensorsReader(directory), base,
                               sharding_lib.model_shardings(base, shardings.mesh))
