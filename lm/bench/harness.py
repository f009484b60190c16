"""Loglikelihood requests per second: lm's harness model against the harness's own Hugging Face backend (`hf`).

    python -m lm.bench.harness [--runs=3] [--passes=3] [--requests=256] [--batch_size=32]

One random Llama (transformers; d=256, 4 layers, 8 heads / 4 KV heads, MLP 1024, vocabulary 32,000, float32) is
saved once and imported into an lm workdir, so both sides score the same weights. The requests are the same for
both: `--requests` (context, continuation) pairs cut from the shipped perplexity task's Python modules at seeded
random places (contexts of 200-600 characters, continuations of 10-60; about 60-200 and 3-20 tokens), scored with
`max_length=256` and `--batch_size` rows a batch. Each run is a fresh subprocess that loads its side, scores all
requests once untimed (lm compiles its bucketed shapes here; that pass is reported too), then `--passes` times;
runs alternate lm, hf, lm, hf, ... `--runs` times. Reported: the median requests/s of each side over runs and
their ratio (above 1.0, lm is faster), and each side's first pass. The harness's `hf` backend builds the full
`[batch, length, vocabulary]` log-softmax; lm scores blockwise (`lm.loss.token_log_probs`). torch, transformers,
accelerate and lm_eval are development dependencies (`pip install -e '.[dev]'`).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags, logging

from lm import harness

LAYERS, D_MODEL, HEADS, KV_HEADS, MLP, VOCAB, MAX_LENGTH = 4, 256, 8, 4, 1024, 32_000, 256

_RUNS = flags.DEFINE_integer("runs", 3, "Alternating runs of each side; the ratio is of the medians.")
_PASSES = flags.DEFINE_integer("passes", 3, "Timed passes over all requests per run (the median is reported).")
_REQUESTS = flags.DEFINE_integer("requests", 256, "Loglikelihood requests per pass.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Rows per batch, both sides.")
_WORKER = flags.DEFINE_enum("worker", None, ["lm", "hf"], "Internal: run one side on --root and print its JSON.")
_ROOT = flags.DEFINE_string("root", None, "Internal: the directory holding hf/ and workdir/.")


def documents() -> list[str]:
    """The shipped perplexity task's Python modules."""
    with open(os.path.join(harness.TASKS_DIR, "lm_python_perplexity.jsonl")) as f:
        return [json.loads(line)["text"] for line in f]


def requests(count: int) -> list[tuple[str, str]]:
    """`count` seeded (context, continuation) pairs cut from `documents()`."""
    texts = documents()
    rng = random.Random(0)
    pairs = []
    for _ in range(count):
        document = rng.choice(texts)
        context_chars, continuation_chars = rng.randint(200, 600), rng.randint(10, 60)
        start = rng.randint(0, max(0, len(document) - context_chars - continuation_chars))
        middle = start + context_chars
        pairs.append((document[start:middle], document[middle:middle + continuation_chars]))
    return pairs


def save_models(root: str) -> None:
    """The random Llama and a byte-level BPE tokenizer (trained on the task's documents) in `root/hf`, imported
    into `root/workdir` in float32."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from lm.hf import convert

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(documents() * 10, trainers.BpeTrainer(
        vocab_size=1024, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=MLP, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=MAX_LENGTH,
        bos_token_id=1, eos_token_id=2, pad_token_id=0))
    model.save_pretrained(os.path.join(root, "hf"))
    fast.save_pretrained(os.path.join(root, "hf"))
    convert.import_checkpoint(os.path.join(root, "hf"), os.path.join(root, "workdir"), {"model.dtype": "float32"})


def run_side(side: str, root: str, count: int, batch_size: int, passes: int) -> dict:
    """Loads one side, scores the requests once untimed, then `passes` times: its first pass and median pass."""
    from lm_eval.api.instance import Instance

    started = time.perf_counter()
    if side == "lm":
        from lm import cpu
        from lm.harness.model import HarnessModel

        cpu.keep_step_memory()  # As every lm program does (lm.cli.run); the reference keeps its process defaults.
        model = HarnessModel(os.path.join(root, "workdir"), batch_size=batch_size, max_length=MAX_LENGTH)
    else:
        from lm_eval.models.huggingface import HFLM

        model = HFLM(pretrained=os.path.join(root, "hf"), batch_size=batch_size, max_length=MAX_LENGTH,
                     device="cpu", dtype="float32")
    load_seconds = time.perf_counter() - started
    instances = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(requests(count))]

    def one_pass() -> float:
        started = time.perf_counter()
        model.loglikelihood(instances, disable_tqdm=True)
        return time.perf_counter() - started

    first = one_pass()
    seconds = statistics.median(one_pass() for _ in range(passes))
    return {"load_seconds": load_seconds, "first_pass_seconds": first, "pass_seconds": seconds,
            "requests_per_second": count / seconds}


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every read at INFO.
    if _WORKER.value:
        print(json.dumps(run_side(_WORKER.value, _ROOT.value, _REQUESTS.value, _BATCH_SIZE.value, _PASSES.value)))
        return
    with tempfile.TemporaryDirectory() as root:
        save_models(root)
        results = {"lm": [], "hf": []}
        for run in range(_RUNS.value):
            for side in ("lm", "hf"):
                output = subprocess.run(
                    [sys.executable, "-m", "lm.bench.harness", f"--worker={side}", f"--root={root}",
                     f"--requests={_REQUESTS.value}", f"--batch_size={_BATCH_SIZE.value}",
                     f"--passes={_PASSES.value}"], capture_output=True, text=True, check=False)
                if output.returncode != 0:
                    raise RuntimeError(f"the {side} worker failed:\n{output.stderr[-3000:]}")
                results[side].append(json.loads(output.stdout.strip().splitlines()[-1]))
                print(f"run {run + 1} {side}: {results[side][-1]}", flush=True)
    median = {side: statistics.median(r["requests_per_second"] for r in runs) for side, runs in results.items()}
    first = {side: statistics.median(r["first_pass_seconds"] for r in runs) for side, runs in results.items()}
    print(f"\n{_REQUESTS.value} loglikelihood requests, batch {_BATCH_SIZE.value}, max_length {MAX_LENGTH}, "
          f"Llama d={D_MODEL} L={LAYERS} vocab={VOCAB}, float32, CPU ({os.cpu_count()} cores), median of "
          f"{_RUNS.value} runs x {_PASSES.value} passes:")
    print("| side | requests/s | first pass (lm: with compilation) |\n|---|---|---|")
    for side in ("lm", "hf"):
        print(f"| {side} | {median[side]:.1f} | {first[side]:.2f} s |")
    print(f"lm / hf requests per second: {median['lm'] / median['hf']:.2f}")


if __name__ == "__main__":
    app.run(main)
