"""Continuous batching over a paged KV cache (vLLM's design, Kwon et al. 2023), in plain JAX.

The engine owns `slots` rows of one `lm.kv_cache.KVCache` in the paged layout: a pool of `pages` pages of
`page_size` slots per layer, and a page table `[slots, pages per row]`. Every `step`:

1. admit: waiting requests take free rows while the pool has the pages their prompt and `max_tokens` need (reserved
   whole at admission, so a running request never waits for memory; page 0 is never handed out, `lm.kv_cache`);
2. forward passes: the oldest row still prefilling feeds the next `chunk` tokens of its prompt alone (`[1, chunk]`),
   then every decoding row its newest token (`[slots, 1]`, idle rows feeding nothing: `Transformer.decode`'s
   `lengths_b`), so decoding rows never pay for a chunk's width;
3. each row whose prompt is all in draws a token from the logits after its last one, with its own settings
   (`lm.sampling.RowSampling`, repetition control from its text so far) and its own seed;
4. finished rows (a stop id, `max_tokens`, or cancelled) free their row and pages at once, so the
   next step admits waiting requests in their place.

`policy="static"` is the baseline continuous batching replaces: a new batch is admitted only when every row of the
last one has finished, so rows that finish early sit idle until the longest is done.

Two compiled programs serve every mix (`[1, chunk]` and `[slots, 1]`; the page pool has no batch axis, so both read
and write the same cache), so after they are warm nothing compiles again (`compiled_programs`). Draws use
`fold_in(key(seed), position)` per row, so a request's tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import threading

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lm import kv_cache
from lm import model as model_lib
from lm.errors import ArgumentError
from lm.sampling import Context, RowSampling, Sampling, distribution

# Alternatives reported per token when a request asks for log-probabilities (OpenAI's chat API allows up to 20).
MAX_TOP_LOGPROBS = 20


@dataclasses.dataclass
class Request:
    """One completion to produce: `prompt` token ids (at least one), up to `max_tokens` new tokens drawn as
    `sampling` says, ending early at a token of `stop_ids`. `logprobs`: the chosen token's log-probability and this
    many alternatives (0 to `MAX_TOP_LOGPROBS`) come with each token. `on_token(event)` is called from the engine's
    thread with every `Event`."""

    prompt: list[int]
    max_tokens: int
    sampling: Sampling = Sampling()
    stop_ids: tuple[int, ...] = ()
    seed: int = 0
    logprobs: int = 0
    on_token: object = None
    id: int = dataclasses.field(default_factory=itertools.count().__next__)


@dataclasses.dataclass(frozen=True)
class Event:
    """A token of request `request_id` (`token` None on a finish without one), its log-probability and top
    alternatives `[(id, log-prob), ...]`, and `finish_reason` on the last event: "stop", "length" or "cancelled"."""

    request_id: int
    token: int | None
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    finish_reason: str | None = None


@dataclasses.dataclass
class _Row:
    request: Request
    pages: list[int]
    length: int  # Tokens of prompt and reply so far (held in the engine's `text_bs`).
    fed: int = 0  # Tokens run through the model (in the cache).

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.request.prompt)

    @property
    def reply_length(self) -> int:
        return self.length - len(self.request.prompt)


class Engine:
    """Continuous batching of `Request`s for one model (module docstring). `step()` runs one scheduler iteration;
    `start()` runs them on a background thread whenever work is waiting."""

    def __init__(self, config: ml_collections.ConfigDict, params, *, slots: int = 8, page_size: int = 16,
                 pages: int | None = None, chunk: int = 64, max_len: int | None = None, policy: str = "continuous"):
        max_len = config.model.max_seq_len if max_len is None else max_len
        if policy not in ("continuous", "static"):
            raise ArgumentError(f"policy must be 'continuous' or 'static', got {policy!r}")
        self.policy = policy
        if min(slots, page_size, chunk, max_len) < 1:
            raise ArgumentError(f"slots, page_size, chunk and max_len must be >= 1, got {slots}, {page_size}, "
                                f"{chunk}, {max_len}")
        self.config, self.params = config, params
        self.model = model_lib.build(config)
        self.slots, self.page_size, self.chunk = slots, page_size, chunk
        self.row_pages = -(-max_len // page_size)
        self.max_len = max_len  # The context a request may fill; its pages may hold a few slots more.
        pages = 1 + slots * self.row_pages if pages is None else pages
        self.cache = kv_cache.KVCache.paged(self.model.cfg, pages, page_size,
                                            np.zeros((slots, self.row_pages), np.int32), np.zeros(slots, np.int32))
        self.free_pages = collections.deque(range(1, pages))  # Page 0 takes the writes that land nowhere.
        self.rows: list[_Row | None] = [None] * slots
        # Each row's page table, text so far (prompt and reply: what it feeds, and its repetition control's
        # context), reply start, seed and sampling settings, kept as arrays and updated as rows change, so a step
        # does not rebuild them from lists.
        self.pages_bj = np.zeros((slots, self.row_pages), np.int32)
        self.text_bs = np.zeros((slots, self.row_pages * page_size), np.int32)
        self.reply_start_b = np.zeros(slots, np.int32)
        self.seeds_b = np.zeros(slots, np.uint32)
        self.sampling_b = RowSampling.of([Sampling()] * slots)
        self.waiting: collections.deque[Request] = collections.deque()
        self.cancelled: set[int] = set()
        self.callbacks: dict[int, object] = {}
        self.lock = threading.Condition()
        self.thread = None
        self.steps = 0
        self._step = jax.jit(functools.partial(_forward_and_draw, self.model), donate_argnums=(1,))

    # ---------------------------------------------------------------------------------------------- requests

    def check(self, request: Request) -> None:
        """Raises `ArgumentError` for a request this engine can never serve (one line naming the field)."""
        if not request.prompt:
            raise ArgumentError("prompt: at least one token is needed")
        if request.max_tokens < 1:
            raise ArgumentError(f"max_tokens must be >= 1, got {request.max_tokens}")
        if len(request.prompt) + request.max_tokens > self.max_len:
            raise ArgumentError(f"prompt ({len(request.prompt)} tokens) + max_tokens ({request.max_tokens}) exceeds "
                                f"the context of {self.max_len} tokens")
        if not 0 <= request.logprobs <= MAX_TOP_LOGPROBS:
            raise ArgumentError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {request.logprobs}")
        if request.sampling.no_repeat_ngram_size:
            raise ArgumentError("no_repeat_ngram_size is not served (it cannot differ per row)")
        vocab = self.config.model.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt):
            raise ArgumentError(f"prompt: token ids must be in [0, {vocab})")

    def submit(self, request: Request) -> int:
        """Queues a request (checked first); returns its id."""
        self.check(request)
        with self.lock:
            self.callbacks[request.id] = request.on_token
            self.waiting.append(request)
            self.lock.notify()
        return request.id

    def cancel(self, request_id: int) -> None:
        """Stops a request (a client went away): its row and pages are freed at the next step."""
        with self.lock:
            self.cancelled.add(request_id)
            self.lock.notify()

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(row is not None for row in self.rows)

    def queue_depth(self) -> int:
        return len(self.waiting)

    def compiled_programs(self) -> int:
        """Programs the step function has compiled so far (one per batch shape)."""
        return self._step._cache_size()

    # ---------------------------------------------------------------------------------------------- the loop

    def start(self) -> None:
        """Runs steps on a daemon thread whenever there is work."""
        def loop():
            while True:
                with self.lock:
                    while not self.busy and not self.cancelled:
                        self.lock.wait()
                self.step()

        self.thread = threading.Thread(target=loop, name="lm-engine", daemon=True)
        self.thread.start()

    def run_until_done(self) -> None:
        """Steps until nothing is running or waiting (tests and benchmarks, without the thread)."""
        while self.busy:
            self.step()

    def step(self) -> list[Event]:
        """One scheduler iteration (module docstring); returns the events it produced (also sent to `on_token`)."""
        events = self._drop_cancelled()
        self._admit()
        active = [b for b, row in enumerate(self.rows) if row is not None]
        decoding = [b for b in active if not self.rows[b].prefilling]
        prefilling = [b for b in active if self.rows[b].prefilling]
        if prefilling:  # The oldest prefilling row's next chunk, alone: decoding rows never pay for its width.
            events += self._run([prefilling[0]], self.chunk)
        if decoding:
            events += self._run([b if b in decoding else None for b in range(self.slots)], 1)
        return self._send(events)

    def _run(self, batch: list[int | None], width: int) -> list[Event]:
        """One forward pass of the rows `batch` (row indices, None for an empty place), each feeding up to `width`
        tokens, and the draws of those whose prompt is then all in."""
        rows = [(i, b, self.rows[b]) for i, b in enumerate(batch) if b is not None]
        size = len(batch)
        place_b = np.asarray([0 if b is None else b for b in batch])
        tokens_bt = np.zeros((size, width), np.int32)
        lengths_b = np.zeros(size, np.int32)
        index_b = np.zeros(size, np.int32)
        for i, b, row in rows:  # Every token not yet in the cache, up to `width`: a prompt chunk, or the newest.
            feed = self.text_bs[b, row.fed:min(row.fed + width, row.length)]
            tokens_bt[i, :len(feed)] = feed
            lengths_b[i] = len(feed)
            index_b[i] = row.fed
        # Each row's table up to the page of the last slot it writes now; every entry after it, and all of an empty
        # place's, point at page 0. Attention masks those slots anyway, and gathering the one sink page (hot in
        # cache) instead of pages reserved for tokens not yet written keeps a step's memory traffic to the tokens
        # there are. An empty place's token (a zero) is written to page 0, never into pages another row owns.
        written_pages_b = (index_b + lengths_b - 1) // self.page_size + 1  # 0 for an empty place.
        pages_bj = np.where(np.arange(self.row_pages) < written_pages_b[:, None], self.pages_bj[place_b], 0)
        context = Context(self.text_bs[place_b], np.zeros(size, np.int32), self.reply_start_b[place_b],
                          index_b + lengths_b)
        settings = jax.tree.map(lambda column_b: column_b[place_b], self.sampling_b)
        # Host arrays all, the cache's slots too: the step's program takes them in (eager jnp calls here would each
        # dispatch a program of their own, about a sixth of a step's time).
        self.cache = self.cache.with_slots(index_b=index_b, start_b=np.zeros(size, np.int32), pages_bj=pages_bj)
        self.cache, token_b, logprob_b, top_ids_bk, top_logprobs_bk = self._step(
            self.params, self.cache, tokens_bt, lengths_b, settings, context, self.seeds_b[place_b])
        token_b, logprob_b, top_ids_bk, top_logprobs_bk = jax.device_get(
            (token_b, logprob_b, top_ids_bk, top_logprobs_bk))
        token_b, logprob_b = token_b.tolist(), logprob_b.tolist()
        self.steps += 1
        events = []
        for i, b, row in rows:
            row.fed += int(lengths_b[i])
            if row.prefilling:
                continue
            token = token_b[i]
            self.text_bs[b, row.length] = token
            row.length += 1
            request = row.request
            top = tuple(zip(top_ids_bk[i, :request.logprobs].tolist(),
                            top_logprobs_bk[i, :request.logprobs].tolist())) if request.logprobs else ()
            finish = None
            if token in request.stop_ids:
                finish = "stop"
            elif row.reply_length >= request.max_tokens:
                finish = "length"
            events.append(Event(request.id, token, logprob_b[i], top, finish))
            if finish is not None:
                self._free(b)
        return events

    def _admit(self) -> None:
        if self.policy == "static" and any(row is not None for row in self.rows):
            return  # Static batching (the baseline): a new batch only once the whole last one has finished.
        with self.lock:
            for b in range(self.slots):
                if self.rows[b] is not None or not self.waiting:
                    continue
                request = self.waiting[0]
                needed = -(-(len(request.prompt) + request.max_tokens) // self.page_size)
                if needed > len(self.free_pages):
                    break  # First come, first served: later requests wait behind it.
                self.waiting.popleft()
                pages = [self.free_pages.popleft() for _ in range(needed)]
                self.rows[b] = _Row(request, pages, len(request.prompt))
                self._place(b, request, pages)

    def _drop_cancelled(self) -> list[Event]:
        with self.lock:
            cancelled, self.cancelled = self.cancelled, set()
            events = [Event(r.id, None, finish_reason="cancelled") for r in self.waiting if r.id in cancelled]
            self.waiting = collections.deque(r for r in self.waiting if r.id not in cancelled)
        for b, row in enumerate(self.rows):
            if row is not None and row.request.id in cancelled:
                events.append(Event(row.request.id, None, finish_reason="cancelled"))
                self._free(b)
        return events

    def _place(self, b: int, request: Request, pages: list[int]) -> None:
        """Writes a request admitted to row b into the per-row arrays."""
        self.pages_bj[b] = 0
        self.pages_bj[b, :len(pages)] = pages
        self.text_bs[b, :len(request.prompt)] = request.prompt
        self.reply_start_b[b] = len(request.prompt)
        self.seeds_b[b] = request.seed
        self.sampling_b = _with_row(self.sampling_b, b, RowSampling.of([request.sampling]))

    def _free(self, b: int) -> None:
        self.free_pages.extend(self.rows[b].pages)
        self.rows[b] = None
        # Default settings: a finished row's top-k or penalties must not make the batch pay for them.
        self.sampling_b = _with_row(self.sampling_b, b, RowSampling.of([Sampling()]))

    def _send(self, events: list[Event]) -> list[Event]:
        for event in events:
            callback = self.callbacks.get(event.request_id)
            if event.finish_reason is not None:
                self.callbacks.pop(event.request_id, None)
            if callback is not None:
                callback(event)
        return events


def _with_row(settings: RowSampling, b: int, row: RowSampling) -> RowSampling:
    """`settings` with row b's values replaced by those of the one-row `row`."""
    def put(column_b, value_1):
        column_b = column_b.copy()
        column_b[b] = value_1[0]
        return column_b

    return jax.tree.map(put, settings, row)


def _forward_and_draw(model, params, cache, tokens_bt, lengths_b, settings: RowSampling, context: Context,
                      seeds_b):
    """The batch's forward pass and each row's draw: `(cache, token_b, logprob_b, top_ids_bk, top_logprobs_bk)`,
    log-probabilities of the model's distribution (before sampling settings), the top `MAX_TOP_LOGPROBS` (or the
    whole vocabulary if smaller)."""
    logits_bv, cache = model.apply({"params": params}, tokens_bt, cache, lengths_b, method=model.decode)
    weights_bv = distribution(logits_bv, settings, context)
    keys_b = jax.vmap(lambda seed, position: jax.random.fold_in(jax.random.key(seed), position))(
        seeds_b, context.length_b)
    token_b = jax.vmap(jax.random.categorical)(keys_b, weights_bv).astype(jnp.int32)
    logprobs_bv = jax.nn.log_softmax(logits_bv, axis=-1)
    top_logprobs_bk, top_ids_bk = jax.lax.top_k(logprobs_bv, min(MAX_TOP_LOGPROBS, logprobs_bv.shape[-1]))
    return cache, token_b, jnp.take_along_axis(logprobs_bv, token_b[:, None], -1)[:, 0], top_ids_bk, top_logprobs_bk
