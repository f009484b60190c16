"""Reference log-probabilities of preference records, computed once and stored with the data (TRL's
`precompute_ref_log_probs`), so a DPO run needs no reference model:

    python -m lm.reference_log_probs --config=configs/tiny.py --config.init_from=REFERENCE \
        --config.finetune.objective=dpo --config.data.source=files --config.data.format=preference \
        --config.data.files='prefs/*.jsonl' --output_dir=prefs_with_reference

Every record of `config.data.files` is scored by the reference, the model `config.init_from` names (the one the DPO
run starts from), and each input file is written again under `--output_dir` with the same relative name and the
same line numbers (so every record keeps its key, FILE:LINE, and its train / validation split) and two fields added:
`ref_chosen_logps` and `ref_rejected_logps`, each side's log-probability summed over its trained tokens. The sides
are the sequences the DPO run will train on: tokenized with its tokenizer and chat template and fitted to its
`config.data.seq_len` (a longer pair is scored truncated, as `overlong=truncate` trains it; a side with no trained
token left scores 0). Run DPO on the written files with `config.finetune.dpo.reference=precomputed` and the same
`seq_len`: the loss then reads these numbers (`lm.data.preference`, `lm.dpo`), and full-parameter DPO holds no copy
of the starting weights and runs no reference forward.
"""

from __future__ import annotations

import json
import os

from absl import flags
import jax
import ml_collections
import numpy as np
from ml_collections import config_flags

from lm import dpo
from lm import init_from as init_from_lib
from lm import model as model_lib
from lm import objective
from lm import paths
from lm import peft
from lm import sharding as sharding_lib
from lm.data import packing, preference, sft, text_files, tokenizer_training
from lm.data.pipeline import pad_id_of
from lm.errors import ArgumentError, ConfigError


def _scorer(config: ml_collections.ConfigDict, shardings: sharding_lib.Shardings):
    """The jitted `score(params, batch) -> [rows]` summed log-probabilities of each row's trained targets."""
    model = model_lib.build(peft.base_config(config))

    def score(params, batch):
        with shardings.activation_rules():
            hidden_btd, kernel_dv = objective.batch_hidden_and_head(params, batch, model)
            return dpo.sequence_log_probs(hidden_btd, kernel_dv, batch["targets"], batch["weights"],
                                          chunk_size=config.loss.chunk_size,
                                          logit_softcap=config.model.logit_softcap)[0]

    return jax.jit(score, in_shardings=(shardings.params, shardings.batch), out_shardings=shardings.replicated)


def precompute(config: ml_collections.ConfigDict, output_dir: str) -> int:
    """Writes `config.data.files` with their reference log-probabilities into `output_dir` (module docstring);
    returns the number of records scored."""
    config = init_from_lib.with_source_model(config)
    if config.finetune.objective != "dpo" or config.data.format != "preference" or not config.init_from:
        raise ConfigError("python -m lm.reference_log_probs scores DPO data: set config.finetune.objective=dpo, "
                          "config.data.format=preference and config.init_from to the reference model")
    spec = text_files.files_spec(config)
    if os.path.abspath(output_dir) == spec.root:
        raise ArgumentError(f"--output_dir={output_dir} is the directory of the input files; write elsewhere")
    base = peft.base_config(config)
    mesh = sharding_lib.make_mesh(config.mesh)
    sharding_lib.check_divisibility(config, mesh)
    shardings = sharding_lib.model_shardings(base, mesh)
    tokenizer = tokenizer_training.get_or_train(config, None)
    template, add_bos = sft.chat_template(config, tokenizer)
    pad_id = pad_id_of(tokenizer)
    padding = packing.padding_example(config.data.seq_len, pad_id)

    # Every record of every file, read and checked as training reads them, then fitted and laid out as rows.
    records, pairs = [], []  # (file, line, fields); to_rows of each.
    for record in sft.all_records(config):
        sides = preference.tokenize(record, tokenizer, template, add_bos)
        fitted, _ = sft.fit_sequences(sides, config.data.seq_len + 1, "truncate")
        relative, _, line_no = record.key.rpartition(":")
        records.append((relative, int(line_no), record.fields))
        pairs.append(None if fitted is None else preference.to_rows(
            {f"{prefix}{name}": array for prefix, (tokens, trained) in fitted.items()
             for name, array in (("tokens", tokens), ("trained", trained.astype(np.int32)))},
            config.data.seq_len, pad_id))

    params = init_from_lib.initial_params(base, shardings)
    score = _scorer(config, shardings)
    per_batch = config.data.batch_size // 2
    log_probs_p2 = np.zeros((len(pairs), 2), np.float32)  # A pair with no trained token left scores 0.
    scored = [i for i, pair in enumerate(pairs) if pair is not None]
    for start in range(0, len(scored), per_batch):
        chunk = scored[start:start + per_batch]
        batch = preference.stack([pairs[i] for i in chunk], config.data.batch_size, padding)
        batch = {name: sharding_lib.from_host(array, shardings.batch) for name, array in batch.items()}
        log_probs_p2[chunk] = np.asarray(jax.device_get(score(params, batch))).reshape(-1, 2)[:len(chunk)]

    if jax.process_index() == 0:
        by_file: dict[str, dict[int, dict]] = {}
        for (relative, line_no, fields), (chosen, rejected) in zip(records, log_probs_p2):
            by_file.setdefault(relative, {})[line_no] = {**fields, sft.REFERENCE_FIELDS[0]: float(chosen),
                                                         sft.REFERENCE_FIELDS[1]: float(rejected)}
        for path in spec.files:
            relative = path[len(spec.root):].lstrip("/")
            out_path = os.path.join(output_dir, relative)
            os.makedirs(os.path.dirname(out_path), exist_ok=True)
            scored_lines = by_file.get(relative, {})
            with open(path, encoding="utf-8") as f:  # Lines as `lm.data.sft` numbers them: split on newlines only.
                lines = [json.dumps(scored_lines[line_no]) + "\n" if line_no in scored_lines else line
                         for line_no, line in enumerate(f, 1)]  # Blank lines kept: the line numbers are the keys.
            paths.write_atomic(paths.resolve(out_path), "".join(lines))
    return len(records)


def main(argv) -> None:
    del argv
    count = precompute(flags.FLAGS.config, flags.FLAGS.output_dir)
    if jax.process_index() == 0:
        print(f"wrote the reference log-probabilities of {count} preference records to {flags.FLAGS.output_dir}")


if __name__ == "__main__":
    from lm import cli

    config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py).", lock_config=True)
    flags.mark_flag_as_required("config")
    flags.DEFINE_string("output_dir", None, "Where the scored files are written.", required=True)
    cli.run(main)

