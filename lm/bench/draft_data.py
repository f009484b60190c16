"""Training text for a speculative-decoding draft: a target run's own greedy continuations of corpus openings
(sequence-level distillation, as DistillSpec does for drafts): a draft trained on what the target says, rather than on
the corpus, agrees with it more often, and agreement is what speculative decoding is paid in.

    python -m lm.bench.draft_data --workdir=TARGET --out=DIR [--prompts=2048] [--prompt_tokens=24]
        [--new_tokens=104] [--batch=64]

Prompts are `--prompt_tokens`-token windows of the built-in corpus's train split, starting at the beginnings of lines
drawn at random (seed 0); the validation files are never used, so the benchmark's prompts stay unseen. Each prompt and
the target's greedy continuation is written as one JSON line `{"text": ...}` to `DIR/continuations.jsonl`. Train the
draft on it with the target's tokenizer (same ids) and `config.data.source=files`:

    python -m lm.train --config=configs/tiny.py --workdir=DRAFT --config.data.source=files
        --config.data.files=DIR/continuations.jsonl --config.data.tokenizer.path=TARGET [--config.model.* ...]
"""

from __future__ import annotations

import json
import os
import time

from absl import flags
import numpy as np

from lm import checkpoint
from lm import cli
from lm import generate
from lm.data import text_files
from lm.data import tokenizer as tokenizer_lib
from lm.errors import ArgumentError


def corpus_prompts(tokenizer, count: int, tokens: int, split: str = "train", seed: int = 0) -> list[list[int]]:
    """`count` windows of `tokens` token ids (BOS first) of the built-in corpus's `split` ("train" or "validation"),
    each starting at the beginning of a line drawn at random."""
    spec = text_files.default_corpus_spec()
    documents = [text for key, text in text_files.read_documents(spec)
                 if text_files.is_validation(key, spec.validation_percent) == (split == "validation")]
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(100 * count):
        lines = documents[rng.integers(len(documents))].splitlines(keepends=True) or [""]
        start = int(rng.integers(len(lines)))
        ids = tokenizer.encode("".join(lines[start:start + 20]))
        if len(ids) >= tokens - 1:
            prompts.append([tokenizer.bos_id, *ids[:tokens - 1]])
            if len(prompts) == count:
                return prompts
    raise ArgumentError(f"the corpus's {split} files gave {len(prompts)} of {count} openings of {tokens} tokens in "
                        f"{100 * count} draws: ask for shorter ones")


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "The target run.", required=True)
    flags.DEFINE_string("out", None, "Directory for continuations.jsonl.", required=True)
    flags.DEFINE_integer("prompts", 2048, "Continuations to write.")
    flags.DEFINE_integer("prompt_tokens", 24, "Tokens of corpus text each continuation starts from.")
    flags.DEFINE_integer("new_tokens", 104, "Greedy tokens the target adds to each.")
    flags.DEFINE_integer("batch", 64, "Prompts decoded at once.")


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    restored = checkpoint.restore(FLAGS.workdir)
    tokenizer = tokenizer_lib.from_workdir(FLAGS.workdir)
    config = restored.config
    config.model.max_seq_len = max(config.model.max_seq_len, FLAGS.prompt_tokens + FLAGS.new_tokens)
    prompts = corpus_prompts(tokenizer, FLAGS.prompts, FLAGS.prompt_tokens)
    os.makedirs(FLAGS.out, exist_ok=True)
    path = os.path.join(FLAGS.out, "continuations.jsonl")
    start = time.perf_counter()
    with open(path, "w") as f:
        for first in range(0, len(prompts), FLAGS.batch):
            batch = prompts[first:first + FLAGS.batch]
            replies = generate.generate(config, restored.params, batch, max_new_tokens=FLAGS.new_tokens,
                                        eos_id=tokenizer.eos_id)
            for prompt, reply in zip(batch, replies):
                reply = [t for t in reply if t != tokenizer.eos_id]
                f.write(json.dumps({"text": tokenizer.decode(prompt[1:] + reply)}) + "\n")
    print(f"{len(prompts)} continuations of {FLAGS.new_tokens} tokens by {FLAGS.workdir} (step {restored.step}) "
          f"in {time.perf_counter() - start:.0f} s: {path}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
