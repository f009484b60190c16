"""Serving: a trace of mixed prompt and output lengths against `lm.serve`, continuous against static batching.

    python -m lm.bench.serve [--config=configs/tiny.py | --workdir=DIR] [--requests=256] [--slots=16]
        [--prompt_tokens=8,128] [--output_tokens=1,512] [--rate=0]

For each batching policy (`lm.serving.engine`: continuous, and static, where a new batch waits for the whole last one)
an `lm.serve` app is run in this process (uvicorn on a free local port), warmed up with a few requests of the trace's
shapes, then sent the trace: `--requests` completions whose prompt and output lengths are drawn log-uniformly from the
given ranges (mostly short requests, a few long ones, spanning the two to three orders of magnitude of chat traffic's
reply lengths; random token ids, temperature 1), all at once (`--rate=0`) or arriving as a Poisson process of `--rate`
requests/s. Every request streams (raw server-sent events over aiohttp, as vLLM's serving benchmark sends them, from
a process of its own as a load generator would be), so the client sees tokens as they arrive (the benchmark's
tokenizer writes token i as `<i>`, and the server has no EOS to stop at, so each request produces exactly its output
length). Reported, all from one run of each: output tokens/s over the trace's makespan, time to first token and
inter-token latency percentiles (p50 / p90 / p99; the time between a request's chunks, and a chunk carries every token
the server had for the request when it wrote it, one in a server that keeps up), and how many programs were compiled
during the timed trace (after the warm-up; 0 is the target). The ratio of the two policies' throughputs is taken in
this run. Then the same trace runs through the engine alone, without HTTP (every request at once): the batching
itself, apart from the server's per-token cost.

Static batching pays, for every batch, for its longest request, so the ratio grows with the spread of output lengths
(about the mean of a batch's longest over the mean length): narrow the range with `--output_tokens` to see it fall.
A config's random model gets the context the trace needs (`max_seq_len` raised if short); a trained `--workdir` keeps
its own, and a trace that does not fit is refused.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import multiprocessing
import socket
import threading
import time

from absl import flags
import flax.linen as nn
import jax
import numpy as np
from ml_collections import config_flags

from lm import cli
from lm import model as model_lib
from lm.errors import ArgumentError

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file (random weights).")
_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run to serve instead of the config's random model.")
_REQUESTS = flags.DEFINE_integer("requests", 256, "Requests in the trace.")
_SLOTS = flags.DEFINE_integer("slots", 16, "Engine rows (requests decoded at once).")
_PROMPT = flags.DEFINE_list("prompt_tokens", ["8", "128"], "Prompt lengths: log-uniform in [low, high].")
_OUTPUT = flags.DEFINE_list("output_tokens", ["1", "512"], "Output lengths: log-uniform in [low, high].")
_RATE = flags.DEFINE_float("rate", 0.0, "Arrivals per second (Poisson); 0: every request at once.")
_CHUNK = flags.DEFINE_integer("chunk", 64, "Prompt tokens a row prefills per step.")


class _Tokenizer:
    """Token ids as text: the trace is ids, and the server's replies are read back as ids (`decode` joins them)."""

    bos_id, pad_id, eos_id, chat_template = None, 0, None, None

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def decode(self, ids) -> str:
        return "".join(f"<{i}>" for i in ids)

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError("the benchmark sends token ids")

    def special_tokens(self) -> dict[str, str]:
        return {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(server) -> tuple[str, object]:
    import uvicorn

    port = _free_port()
    runner = uvicorn.Server(uvicorn.Config(server.app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=runner.run, daemon=True).start()
    while not runner.started:
        time.sleep(0.05)
    server.engine.start()
    return f"http://127.0.0.1:{port}/v1", runner


def _client(base_url: str, trace, rate: float, seed: int):
    """Runs `_run_trace` in a process of its own, as a load generator would be: the client's parsing of every chunk
    then does not take the server's interpreter lock from its engine thread and event loop."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(_trace_in_process, base_url, trace, rate, seed).result()


def _trace_in_process(base_url: str, trace, rate: float, seed: int):
    return asyncio.run(_run_trace(base_url, trace, rate, seed))


async def _run_trace(base_url: str, trace, rate: float, seed: int):
    """Sends the trace; returns `(makespan_s, tokens, first_token_s, inter_token_s)`. Each request streams over
    aiohttp and its server-sent events are read as JSON, as vLLM's serving benchmark reads them: the `openai`
    client's parsing of every chunk into objects would take more of the CPU the server shares than the server's own
    chunk does (the tests check the server against that client)."""
    import aiohttp

    rng = np.random.default_rng(seed)
    first, gaps, tokens = [], [], 0
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600),
                                    connector=aiohttp.TCPConnector(limit=0))  # Every request at once.

    async def one(prompt, output, delay):
        nonlocal tokens
        await asyncio.sleep(delay)
        sent = time.perf_counter()
        body = {"model": "lm", "prompt": prompt, "max_tokens": output, "temperature": 1.0, "stream": True,
                "seed": int(rng.integers(2**31))}
        last = None
        async with session.post(f"{base_url}/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.content:  # Lines of the event stream: "data: {...}", blank, "data: [DONE]".
                now = time.perf_counter()
                if not line.startswith(b"data: {"):
                    continue
                text = json.loads(line[len(b"data: "):])["choices"][0]["text"]
                if not text:
                    continue
                tokens += text.count("<")
                if last is None:
                    first.append(now - sent)
                else:
                    gaps.append(now - last)
                last = now

    delays = np.cumsum(rng.exponential(1 / rate, len(trace))) if rate > 0 else np.zeros(len(trace))
    start = time.perf_counter()
    await asyncio.gather(*(one(p, o, d) for (p, o), d in zip(trace, delays)))
    makespan = time.perf_counter() - start
    await session.close()
    return makespan, tokens, np.asarray(first), np.asarray(gaps)


def _percentiles(values_s: np.ndarray) -> str:
    p50, p90, p99 = np.percentile(values_s * 1e3, [50, 90, 99]) if len(values_s) else (0, 0, 0)
    return f"{p50:>7.0f} {p90:>7.0f} {p99:>7.0f}"


def main(argv):
    del argv
    from lm import serve

    low_p, high_p = map(int, _PROMPT.value)
    low_o, high_o = map(int, _OUTPUT.value)
    if _WORKDIR.value:
        from lm import checkpoint

        restored = checkpoint.restore(_WORKDIR.value)
        config, params = restored.config, restored.params
    else:
        config = _CONFIG.value
        config.model.max_seq_len = max(config.model.max_seq_len, high_p + high_o)
        params = nn.unbox(model_lib.init(model_lib.build(config), jax.random.key(0)))
    vocab = config.model.vocab_size
    rng = np.random.default_rng(0)
    if high_p + high_o > config.model.max_seq_len:
        raise ArgumentError(f"--prompt_tokens and --output_tokens ({high_p} + {high_o}) exceed the model's "
                                f"max_seq_len={config.model.max_seq_len}")
    # Log-uniform lengths: mostly short requests and a few long ones, as in chat traffic.
    length = lambda low, high: int(np.exp(rng.uniform(np.log(low), np.log(high + 1))))
    trace = [(rng.integers(1, vocab, length(low_p, high_p)).tolist(), length(low_o, high_o))
             for _ in range(_REQUESTS.value)]
    # Warm-up: one request of each compiled shape's kind (a prompt longer than a chunk, then decoding).
    warm_up = [(trace[0][0][:1] * (_CHUNK.value + 1), 2)] * 2
    print(f"{config.model.num_layers} layers, d_model {config.model.d_model}, vocab {vocab}, context "
          f"{config.model.max_seq_len}; {len(trace)} requests, "
          f"prompts {low_p}-{high_p} tokens, outputs {low_o}-{high_o} tokens, "
          f"{'all at once' if not _RATE.value else f'{_RATE.value:g} requests/s'}; {_SLOTS.value} rows, "
          f"{jax.devices()[0].device_kind}")
    print(f"{'batching':>10}  {'tokens/s':>8}  {'makespan s':>10}  {'TTFT ms p50 p90 p99':>23}  "
          f"{'ITL ms p50 p90 p99':>23}  compiles after warm-up")
    throughput = {}
    for policy in ("continuous", "static"):
        server = serve.Server(config, params, _Tokenizer(vocab), model_name="lm", slots=_SLOTS.value,
                              chunk=_CHUNK.value, policy=policy)
        base_url, runner = _start(server)
        _client(base_url, warm_up, 0.0, seed=1)
        compiled = server.engine.compiled_programs()
        makespan, tokens, first, gaps = _client(base_url, trace, _RATE.value, seed=2)
        throughput[policy] = tokens / makespan
        print(f"{policy:>10}  {tokens / makespan:>8,.0f}  {makespan:>10.1f}  {_percentiles(first):>23}  "
              f"{_percentiles(gaps):>23}  {server.engine.compiled_programs() - compiled}")
        runner.should_exit = True
    print(f"continuous / static throughput: {throughput['continuous'] / throughput['static']:.2f}x")
    _engine_alone(config, params, trace, warm_up)


def _engine_alone(config, params, trace, warm_up) -> None:
    """The same trace through `lm.serving.engine.Engine` directly, every request at once, no HTTP: what the batching
    itself gives, apart from the server's per-token cost (events, JSON, the event stream, the client)."""
    from lm.serving import engine as engine_lib
    from lm.sampling import Sampling

    print(f"engine alone (no HTTP), the same trace at once:\n{'batching':>10}  {'tokens/s':>8}  {'makespan s':>10}  "
          f"{'forward passes':>14}  compiles after warm-up")
    throughput = {}
    for policy in ("continuous", "static"):
        engine = engine_lib.Engine(config, params, slots=_SLOTS.value, chunk=_CHUNK.value, policy=policy)
        for prompt, output in warm_up:
            engine.submit(engine_lib.Request(prompt, output))
        engine.run_until_done()
        compiled, steps = engine.compiled_programs(), engine.steps
        for seed, (prompt, output) in enumerate(trace):
            engine.submit(engine_lib.Request(prompt, output, Sampling(temperature=1.0), seed=seed))
        start = time.perf_counter()
        engine.run_until_done()
        makespan = time.perf_counter() - start
        throughput[policy] = sum(output for _, output in trace) / makespan
        print(f"{policy:>10}  {throughput[policy]:>8,.0f}  {makespan:>10.1f}  {engine.steps - steps:>14,}  "
              f"{engine.compiled_programs() - compiled}")
    print(f"continuous / static throughput, engine alone: {throughput['continuous'] / throughput['static']:.2f}x")


if __name__ == "__main__":
    cli.run(main)
