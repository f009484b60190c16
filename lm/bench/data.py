"""Input-pipeline throughput: tokens per second of the packed pipeline, and the size of the corpus it reads.

    python -m lm.bench.data [--config=configs/tiny.py] [--batches=2000] [--train_steps=5]

Prints, for the configured source (the default corpus for `configs/tiny.py`):
- the corpus: documents, characters and tokens (with the run's tokenizer) per split;
- the time to prepare the source and get the tokenizer (training it when it is not cached);
- tokens per second (`batch_size * seq_len` per batch) of the training pipeline as the trainer uses it (shuffled,
  packed, tokenized on the fly, one prefetch thread), of the same without the thread or with one document per row,
  and of the evaluation layout (`windows`, repeated here so it lasts); each after a warm-up, over `--batches`
  batches, in this process;
- what the trainer consumes: tokens per second of the real train step (`lm.train_step`) for the same config, timed
  in this process over `--train_steps` steps after a compile step, and the pipeline's margin over it (the
  requirement is >= 10x).
"""

from __future__ import annotations

import os
import time

from absl import flags
from ml_collections import config_flags

from lm import cli

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
config_flags.DEFINE_config_file("config", os.path.join(_REPO, "configs", "tiny.py"), "Config file.")
flags.DEFINE_integer("batches", 2000, "Batches timed per measurement.")
flags.DEFINE_integer("warmup", 50, "Batches before timing starts.")
flags.DEFINE_integer("train_steps", 5, "Train steps timed to measure what the trainer consumes.")
FLAGS = flags.FLAGS


def corpus_stats(config, tokenizer) -> list[tuple[str, int, int, int]]:
    """(split, documents, characters, tokens) for the train and eval splits; tokens without BOS/EOS."""
    from lm.data import sources

    rows = []
    for split in (config.data.train_split, config.data.eval_split):
        texts = list(sources.iter_texts(sources.resolve(config, split)))
        tokens = sum(len(tokenizer.encode(text)) for text in texts)
        rows.append((split, len(texts), sum(len(t) for t in texts), tokens))
    return rows


def tokens_per_second(iterator, batches: int, warmup: int) -> tuple[float, float]:
    """(tokens/s, target tokens with weight 1 / s) over `batches` batches after `warmup`."""
    for _ in range(warmup):
        next(iterator)
    tokens = targets = 0.0
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
        tokens += batch["inputs"].size
        targets += float(batch["weights"].sum())
    seconds = time.perf_counter() - start
    iterator.close()
    return tokens / seconds, targets / seconds


def main(argv):
    del argv
    from lm import config as lm_config
    from lm.data import pipeline, sources, tokenizer_training

    config = lm_config.validate(FLAGS.config)
    d = config.data
    print(f"config: source={d.source} name={d.name!r} seq_len={d.seq_len} batch_size={d.batch_size} "
          f"vocab={d.tokenizer.vocab_size} cpus={os.cpu_count()}")
    tokenizer = None
    if d.source != "synthetic":
        start = time.perf_counter()
        train_split = sources.resolve(config, d.train_split)
        tokenizer = tokenizer_training.get_or_train(config, train_split)
        print(f"source + tokenizer ready in {time.perf_counter() - start:.1f} s "
              f"(tokenizer {tokenizer.vocab_size} pieces, {tokenizer_training.cached_path(config, train_split)})")
        print(f"{'split':>12} {'documents':>10} {'characters':>12} {'tokens':>10} {'chars/token':>12}")
        for split, docs, chars, tokens in corpus_stats(config, tokenizer):
            print(f"{split:>12} {docs:>10} {chars:>12} {tokens:>10} {chars / tokens:>12.2f}")

    runs = [
        ("train: packed, shuffled, prefetch thread", dict(shuffle=True)),
        ("train: packed, shuffled, no thread", dict(shuffle=True, prefetch=0)),
        ("train: one document per row (pack=False)", dict(shuffle=True, layout="pad")),
        ("eval: windows packed whole, in order", dict(shuffle=False, layout="windows")),
    ]
    if d.source == "synthetic":
        runs = runs[:1]
    train_pipeline_rate = None
    for name, kwargs in runs:
        start = time.perf_counter()
        split = d.eval_split if name.startswith("eval") else d.train_split
        iterator = pipeline.make_iterator(config, split, tokenizer=tokenizer, **kwargs)
        setup = time.perf_counter() - start
        rate, target_rate = tokens_per_second(iterator, FLAGS.batches, FLAGS.warmup)
        if train_pipeline_rate is None:
            train_pipeline_rate = rate  # The trainer's own pipeline: shuffled, packed, prefetched.
        print(f"{name:<44} {rate:>12,.0f} tokens/s  ({target_rate:>11,.0f} trained targets/s; setup {setup:.2f} s)")
    from lm.bench import train as train_bench

    _, consumed, _, _ = train_bench.step_tokens_per_second(config, FLAGS.train_steps)
    print(f"the train step consumes {consumed:,.0f} tokens/s (measured, same config); the training pipeline "
          f"delivers {train_pipeline_rate / consumed:.0f}x that (required: >= 10x)")


if __name__ == "__main__":
    cli.run(main)
