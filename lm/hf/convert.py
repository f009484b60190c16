"""Hugging Face model directory <-> lm workdir.

`import_checkpoint(source, workdir)` makes an lm workdir of a Hugging Face model: `config.json` (the lm config the
Hugging Face one implies, with the caller's overrides), a weights-only orbax checkpoint at step 0, the tokenizer
files, and `hf/` (the model's own `config.json` and `generation_config.json`, kept so an export writes them back).
`lm.evaluate` and `lm.generate` read it like any run; training starts from it with `config.init_from`.

`export_checkpoint(workdir, out)` writes a checkpoint of any lm run whose model has a Hugging Face architecture as a
directory `transformers.AutoModelForCausalLM.from_pretrained` loads: `config.json`, safetensors weights (sharded,
with their index, past `max_shard_bytes`), `generation_config.json` and the tokenizer files when the run has them;
a run's own SentencePiece `tokenizer.model` is also converted to the `tokenizer.json` and `tokenizer_config.json`
that `transformers.AutoTokenizer` loads (`lm.hf.sentencepiece`), and its special token ids go into `config.json`.
A LoRA run exports merged (`lm.peft.merge_lora`: a plain model computing what base + adapters do); a prefix or LoReFT
run cannot be merged and is refused.

`export_adapter(workdir, out)` writes a LoRA run's adapters alone in PEFT's format (`adapter_config.json` and
`adapter_model.safetensors`, Llama-family models): `peft.PeftModel.from_pretrained(base, out)` over the export of
the run's base (`export_checkpoint` of `config.init_from`) computes what the lm run does.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import ml_collections

from lm import checkpoint
from lm import config as lm_config
from lm import paths
from lm import peft
from lm import sharding as sharding_lib
from lm import workdir as workdir_lib
from lm.data import tokenizer as tokenizer_lib
from lm.errors import CheckpointError, ConfigError
import lm.hf.architectures as architectures
import lm.hf.sentencepiece as sentencepiece
import lm.hf.weights as weights

HF_DIR = "hf"  # In an imported workdir: the model's own Hugging Face config files.
HF_CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
HUB_FILES = ["*.json", "model*.safetensors", "tokenizer.model"]  # What an import downloads of a hub repository.
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # As transformers' save_pretrained.
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # PEFT's file names.


def resolve_source(source: str) -> str:
    """A local model directory as is; otherwise a hub id, downloaded (config, safetensors, tokenizer files) with
    `huggingface_hub` into its cache. ConfigError when neither works."""
    if os.path.isdir(source):
        return source
    if os.path.exists(source) or source.startswith((".", "/")) or source.count("/") != 1:
        raise ConfigError(f"--hf={source!r} is not a model directory (nor a hub id like 'org/name')")
    try:
        from huggingface_hub import snapshot_download

        # transformers' weight files only: Mistral's repositories also carry a consolidated.safetensors of their own.
        return snapshot_download(source, allow_patterns=HUB_FILES)
    except Exception as error:  # Offline, unknown repository, gated model: the hub says which.
        message = " ".join(str(error).split())[:200]
        raise ConfigError(f"--hf={source!r} is not a local directory and could not be downloaded from the Hugging "
                          f"Face hub ({type(error).__name__}: {message})") from None


def read_hf_config(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist: {directory} is not a Hugging Face model directory") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error})") from None


def config_for(directory: str, overrides: dict[str, Any] | None = None) -> ml_collections.ConfigDict:
    """The lm run config of the Hugging Face model in `directory`: `base_config()` with the model section from its
    `config.json`, then `overrides` (flat dotted keys, as `--config.a.b=value`), validated."""
    hf_config = read_hf_config(directory)
    config = lm_config.base_config()
    config.model.update(architectures.config_from_hf(hf_config, os.path.join(directory, "config.json")))
    config.data.seq_len = min(config.data.seq_len, config.model.max_seq_len)
    config.update_from_flattened_dict(dict(overrides or {}))
    lm_config.validate(config)
    architectures.check_sliding_window(hf_config, config, os.path.join(directory, "config.json"))
    return config


def load_params(directory: str, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None):
    """The model's parameters placed on `mesh` (default: the config's) by lm's sharding rules:
    `(params, shardings)`."""
    mesh = sharding_lib.default_mesh(config) if mesh is None else mesh
    shardings = sharding_lib.model_shardings(config, mesh)
    return weights.load_params(weights.SafetensorsReader(directory), config, shardings), shardings


def import_checkpoint(source: str, workdir: str, overrides: dict[str, Any] | None = None,
                      mesh: jax.sharding.Mesh | None = None) -> ml_collections.ConfigDict:
    """Writes an lm workdir of the Hugging Face model `source` (a directory or hub id); returns its config.

    `overrides`: flat dotted config fields (`{"model.dtype": "float32"}`) applied over the model's own. Refuses a
    workdir that already holds checkpoints; nothing is written before the config, the tensors' names and shapes
    have been checked."""
    directory = resolve_source(source)
    config = config_for(directory, overrides)
    reader = weights.SafetensorsReader(directory)
    mesh = sharding_lib.default_mesh(config) if mesh is None else mesh
    shardings = sharding_lib.model_shardings(config, mesh)
    weights.check_tensors(reader, config, shardings.abstract_params)
    if os.path.isdir(paths.resolve(workdir, checkpoint.CHECKPOINT_DIR)):
        raise CheckpointError(f"--workdir={workdir} already holds checkpoints; import into a new workdir")
    workdir_lib.ensure_directory(workdir)
    with workdir_lib.WorkdirLock(workdir):
        params = weights.load_params(reader, config, shardings)
        if jax.process_index() == 0:
            os.makedirs(paths.resolve(workdir, HF_DIR), exist_ok=True)
            for name in HF_CONFIG_FILES:
                if os.path.isfile(os.path.join(directory, name)):
                    shutil.copyfile(os.path.join(directory, name), paths.resolve(workdir, HF_DIR, name))
            for name in TOKENIZER_FILES:
                if os.path.isfile(os.path.join(directory, name)):
                    shutil.copyfile(os.path.join(directory, name), paths.resolve(workdir, name))
            lm_config.write_config(workdir, config)
        checkpoint.save_weights(workdir, 0, params, config)
    return config


def export_checkpoint(workdir: str, out: str, step: int | None = None,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Writes the checkpoint `step` (default: the latest) of `workdir` as a Hugging Face model directory `out`
    (module docstring); returns the weight files written. Refuses an `out` that exists and is not empty."""
    _check_out(out)
    config = lm_config.read_config(workdir)
    _refuse_reward_model(workdir, config)
    if peft.is_peft(config) and config.finetune.method != "lora":
        raise CheckpointError(f"{workdir} holds {config.finetune.method} adapters, which cannot be merged into the "
                              f"base's weights: only LoRA runs export as a Hugging Face model")
    hf_dir = _hf_dir(workdir, config)
    base_path = paths.resolve(hf_dir, "config.json")
    base = json.loads(base_path.read_text()) if base_path.exists() else None
    hf_config = architectures.hf_config_from(config, base)  # Fails before anything is read if there is none.
    tokenizer_files = _tokenizer_files(workdir, config)
    if base is None and tokenizer_lib.in_workdir(workdir):  # An imported model's file has its own ids.
        tokenizer = tokenizer_lib.from_workdir(workdir)
        hf_config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    restored = checkpoint.restore(workdir, step)
    params = peft.merge_lora(restored.params, config) if peft.is_peft(config) else restored.params
    if jax.process_index() == 0:
        os.makedirs(out, exist_ok=True)
    files = weights.save_params(params, peft.base_config(config), out, max_shard_bytes)
    if jax.process_index() == 0:
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)
        generation = paths.resolve(hf_dir, "generation_config.json")
        if generation.exists():
            shutil.copyfile(generation, os.path.join(out, "generation_config.json"))
        for name, data in tokenizer_files.items():
            with open(os.path.join(out, name), "wb") as f:
                f.write(data)
    return files


def _refuse_reward_model(workdir: str, config) -> None:
    """A reward model is a sequence classifier (its scalar head), not the causal LM an export writes."""
    if config.finetune.objective == "reward":
        raise CheckpointError(f"{workdir} is a reward model (finetune.objective='reward'): exports write causal LMs, "
                              f"and its scalar head would be lost")


def export_adapter(workdir: str, out: str, step: int | None = None) -> list[str]:
    """Writes the adapters of LoRA run `workdir` (checkpoint `step`, default the latest) into `out` in PEFT's format
    (module docstring); returns the files written."""
    _check_out(out)
    config = lm_config.read_config(workdir)
    _refuse_reward_model(workdir, config)
    if config.finetune.method != "lora":
        raise CheckpointError(f"{workdir} is a {config.finetune.method} run; PEFT adapters are exported from LoRA runs")
    architecture = architectures.architecture_for(config)
    if architecture not in architectures.LLAMA_LIKE:
        raise ConfigError(f"{workdir}: PEFT adapters are exported for {', '.join(architectures.LLAMA_LIKE)} models, "
                          f"not {architecture}")
    restored = checkpoint.restore(workdir, step)
    tensors = dict(weights.lora_tensors(peft.split(restored.params)[1], config))
    lora = config.finetune.lora
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "target_modules": sorted({name.split(".")[-3] for name in tensors}),
        "base_model_name_or_path": checkpoint.workdir_and_step(config.init_from)[0],
    }
    if jax.process_index() == 0:
        os.makedirs(out, exist_ok=True)
        weights.write_safetensors(os.path.join(out, ADAPTER_WEIGHTS), tensors)
        with open(os.path.join(out, ADAPTER_CONFIG), "w") as f:
            json.dump(adapter_config, f, indent=2, sort_keys=True)
    return [ADAPTER_CONFIG, ADAPTER_WEIGHTS]


def _check_out(out: str) -> None:
    if os.path.isdir(out) and os.listdir(out) or os.path.isfile(out):
        raise CheckpointError(f"--out={out} exists and is not an empty directory; export into a new one")


def _hf_dir(workdir: str, config: ml_collections.ConfigDict) -> str:
    """Where the Hugging Face config files of `workdir`'s model are kept: its own `hf/`, or its base's for a PEFT
    run (which may be an import)."""
    if peft.is_peft(config):
        return os.path.join(checkpoint.workdir_and_step(config.init_from)[0], HF_DIR)
    return str(paths.resolve(workdir, HF_DIR))


def _tokenizer_files(workdir: str, config: ml_collections.ConfigDict) -> dict[str, bytes]:
    """The tokenizer files an export of `workdir` writes, by name: those it has, and for a SentencePiece
    `tokenizer.model` without a `tokenizer.json` (a run's own tokenizer) the converted fast tokenizer."""
    files = {name: paths.resolve(workdir, name).read_bytes() for name in TOKENIZER_FILES
             if paths.resolve(workdir, name).exists()}
    if tokenizer_lib.SENTENCEPIECE_FILE in files and tokenizer_lib.HF_FILE not in files:
        files.update(sentencepiece.convert(tokenizer_lib.from_workdir(workdir), config.model.max_seq_len))
    return files


def is_imported(workdir: str) -> bool:
    """Whether `workdir` was made by `import_checkpoint` (weights only: no optimizer state, no data position)."""
    return paths.resolve(workdir, HF_DIR, "config.json").exists()

