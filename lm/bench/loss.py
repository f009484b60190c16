"""Naive vs blockwise cross-entropy: compiled temporary memory and measured time of `value_and_grad`.

    python -m lm.bench.loss [--cases=big_fp32,big_bf16,gpt2_fp32,gpt2_bf16] [--chunk_size=N] [--repeats=7]

For each case both versions are compiled in this process; the gradient is taken with respect to hidden and kernel.
Memory is XLA's `memory_analysis().temp_size_in_bytes` of the compiled `value_and_grad` (temporaries only: inputs
and outputs are excluded), found by compiling for `jax.ShapeDtypeStruct` inputs, so nothing is allocated. Time is
measured where the case asks for it (on CPU the 256k-vocabulary cases are compile-only): after one warm-up call each,
naive and blockwise calls alternate, so both see the same machine load, and the table shows the medians and the
ratio blockwise / naive.

The naive version is what one writes without thinking about memory: full `[N, V]` fp32 logits (matmul in the input
dtype with fp32 accumulation), `logsumexp` minus the target logit, mean, differentiated by JAX.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from lm import cli
from lm import loss as lm_loss
from lm.errors import ArgumentError

_CASES = flags.DEFINE_list("cases", ["big_fp32", "big_bf16", "gpt2_fp32", "gpt2_bf16"], "Cases to run (see CASES).")
_CHUNK_SIZE = flags.DEFINE_integer("chunk_size", None, "Vocabulary block size; default: each case's own.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed calls per version (after one warm-up call each).")
_TIME_ALL = flags.DEFINE_bool("time_all", False, "Also time the cases that are compile-only on CPU.")


@dataclasses.dataclass(frozen=True)
class Case:
    tokens: int
    d_model: int
    vocab: int
    dtype: str
    chunk_size: int
    time_on_cpu: bool  # The 256k cases need ~20 GB (naive) and minutes per call on CPU: memory only there.


CASES = {
    "big_fp32": Case(8192, 2304, 256_000, "float32", 1024, time_on_cpu=False),
    "big_bf16": Case(8192, 2304, 256_000, "bfloat16", 1024, time_on_cpu=False),
    "gpt2_fp32": Case(4096, 768, 50_257, "float32", 4096, time_on_cpu=True),
    "gpt2_bf16": Case(4096, 768, 50_257, "bfloat16", 4096, time_on_cpu=True),
}


def naive_loss(hidden_xd, kernel_dv, targets_x):
    """Mean cross-entropy through full `[N, V]` fp32 logits."""
    logits_xv = jnp.dot(hidden_xd, kernel_dv, preferred_element_type=jnp.float32)
    lse_x = jax.nn.logsumexp(logits_xv, axis=-1)
    target_logit_x = jnp.take_along_axis(logits_xv, targets_x[:, None], axis=-1)[:, 0]
    return jnp.mean(lse_x - target_logit_x)


def chunked_loss(hidden_xd, kernel_dv, targets_x, *, chunk_size):
    return lm_loss.cross_entropy(hidden_xd, kernel_dv, targets_x, chunk_size=chunk_size)[0]


def _compile(loss_fn, case: Case):
    grad_fn = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))
    dtype = jnp.dtype(case.dtype)
    specs = (jax.ShapeDtypeStruct((case.tokens, case.d_model), dtype),
             jax.ShapeDtypeStruct((case.d_model, case.vocab), dtype),
             jax.ShapeDtypeStruct((case.tokens,), jnp.int32))
    return grad_fn.lower(*specs).compile()


def _inputs(case: Case):
    k_hidden, k_kernel, k_targets = jax.random.split(jax.random.key(0), 3)
    dtype = jnp.dtype(case.dtype)
    hidden_xd = jax.random.normal(k_hidden, (case.tokens, case.d_model), jnp.float32).astype(dtype)
    kernel_dv = (jax.random.normal(k_kernel, (case.d_model, case.vocab), jnp.float32)
                 / np.sqrt(case.d_model)).astype(dtype)
    targets_x = jax.random.randint(k_targets, (case.tokens,), 0, case.vocab)
    return hidden_xd, kernel_dv, targets_x


def _time(compiled_by_name, args, repeats):
    """Median seconds per call of each compiled function; calls alternate between the functions."""
    for compiled in compiled_by_name.values():
        jax.block_until_ready(compiled(*args))  # Warm-up (first-call allocations, thread pools).
    seconds = {name: [] for name in compiled_by_name}
    for _ in range(repeats):
        for name, compiled in compiled_by_name.items():
            start = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def run_case(name: str, case: Case, repeats: int, time_all: bool) -> dict:
    chunk_size = case.chunk_size
    compiled = {
        "naive": _compile(naive_loss, case),
        "chunked": _compile(lambda h, w, t: chunked_loss(h, w, t, chunk_size=chunk_size), case),
    }
    row = {"case": name, "shape": f"N={case.tokens} D={case.d_model} V={case.vocab}", "dtype": case.dtype,
           "chunk": chunk_size}
    for version, c in compiled.items():
        row[f"{version}_mb"] = c.memory_analysis().temp_size_in_bytes / 1e6
    if case.time_on_cpu or time_all or jax.default_backend() != "cpu":
        medians = _time(compiled, _inputs(case), repeats)
        row.update(naive_seconds=medians["naive"], chunked_seconds=medians["chunked"],
                   ratio=medians["chunked"] / medians["naive"])
    return row


def format_table(rows) -> str:
    header = ("| case | shape | dtype | chunk | naive temp MB | chunked temp MB | memory ratio | naive s | chunked s "
              "| time ratio |")
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for r in rows:
        timed = "naive_seconds" in r
        lines.append(
            f"| {r['case']} | {r['shape']} | {r['dtype']} | {r['chunk']} | {r['naive_mb']:,.0f} | "
            f"{r['chunked_mb']:,.0f} | {r['chunked_mb'] / r['naive_mb']:.3f} | "
            + (f"{r['naive_seconds']:.2f} | {r['chunked_seconds']:.2f} | {r['ratio']:.2f} |" if timed else "- | - | - |"))
    return "\n".join(lines)


def main(argv):
    del argv
    unknown = [name for name in _CASES.value if name not in CASES]
    if unknown:
        raise ArgumentError(f"--cases: unknown {unknown}; expected some of {', '.join(CASES)}")
    print(f"backend={jax.default_backend()} devices={jax.device_count()} "
          f"({jax.devices()[0].device_kind}) jax={jax.__version__}, value_and_grad w.r.t. hidden and kernel")
    rows = []
    for name in _CASES.value:
        case = CASES[name]
        if _CHUNK_SIZE.value is not None:
            case = dataclasses.replace(case, chunk_size=_CHUNK_SIZE.value)
        rows.append(run_case(name, case, _REPEATS.value, _TIME_ALL.value))
        print(f"done: {name}", flush=True)
    print(format_table(rows))


if __name__ == "__main__":
    cli.run(main)
