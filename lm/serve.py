"""An OpenAI-compatible HTTP server for a run's model, on the continuous-batching engine (`lm.serving.engine`).

    pip install -e '.[serve]'
    python -m lm.serve --workdir=DIR [--port=8000] [--host=127.0.0.1] [--step=N] [--slots=8] [--page_size=16]
        [--chunk=64] [--policy=continuous|static]

Endpoints (FastAPI on uvicorn):
- `POST /v1/completions` and `POST /v1/chat/completions`: OpenAI's request and response shapes, streaming with
  server-sent events (`stream`), `max_tokens`, `temperature`, `top_p`, `n`, `stop`, `seed`, `logprobs` (and
  `top_logprobs` for chat), `frequency_penalty`, `presence_penalty`, and vLLM's extras `top_k`, `min_p`,
  `repetition_penalty`. A chat is rendered with the run's chat template (`lm.data.sft.chat_template`).
- `GET /health`, `GET /v1/models`, and `GET /metrics` in Prometheus' text format: requests by endpoint and
  status, prompt and generated tokens, generated tokens per second, queue depth, running requests, cancelled
  requests, time to first token.

A bad request (malformed JSON, an unknown field, a value out of range, a prompt longer than the context) gets a
400 with OpenAI's error body `{"error": {"message", "type", "param", "code"}}`, never a crash. A client that
disconnects from a stream has its request cancelled, which frees its engine row and pages at the next step.
Stop strings are matched on the decoded reply here (the engine stops on ids); the text is cut before the stop.
"""

from __future__ import annotations

import asyncio
import collections
import json
import threading
import time
import uuid
from typing import Literal

from absl import flags

from lm import checkpoint
from lm.data import tokenizer as tokenizer_lib
from lm.errors import ArgumentError
from lm.sampling import Sampling
from lm.serving import engine as engine_lib

try:
    import fastapi
    import prometheus_client
    import pydantic
    import uvicorn
    from fastapi import responses
except ImportError as missing:  # An optional feature: one line naming the extra.
    raise ImportError(f"lm.serve needs the 'serve' extra: pip install -e '.[serve]' ({missing.name} is missing)"
                      ) from None


class _Request(pydantic.BaseModel):
    """Fields both endpoints share (OpenAI's defaults); any other field is an error."""

    model_config = pydantic.ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = pydantic.Field(default=None, ge=1)
    temperature: float = pydantic.Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = pydantic.Field(default=1.0, gt=0.0, le=1.0)
    n: int = pydantic.Field(default=1, ge=1, le=16)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    frequency_penalty: float = pydantic.Field(default=0.0, ge=-2.0, le=2.0)
    presence_penalty: float = pydantic.Field(default=0.0, ge=-2.0, le=2.0)
    top_k: int = pydantic.Field(default=0, ge=0)
    min_p: float = pydantic.Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = pydantic.Field(default=1.0, gt=0.0)
    user: str | None = None
    stream_options: dict | None = None

    def sampling(self) -> Sampling:
        return Sampling(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                        repetition_penalty=self.repetition_penalty, frequency_penalty=self.frequency_penalty,
                        presence_penalty=self.presence_penalty)

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = pydantic.Field(default=16, ge=1)
    logprobs: int | None = pydantic.Field(default=None, ge=0, le=5)
    echo: bool = False


class ChatMessage(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatRequest(_Request):
    messages: list[ChatMessage] = pydantic.Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = pydantic.Field(default=None, ge=0, le=engine_lib.MAX_TOP_LOGPROBS)
    max_completion_tokens: int | None = pydantic.Field(default=None, ge=1)


class BadRequest(ArgumentError):
    """A request the server refuses: answered with `status` and OpenAI's error body naming `param`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


def _error(status: int, message: str, param: str | None = None) -> responses.JSONResponse:
    return responses.JSONResponse(status_code=status, content={"error": {
        "message": message, "type": "invalid_request_error", "param": param, "code": None}})


class Metrics:
    """The server's Prometheus metrics, in a registry of its own."""

    def __init__(self, engine: engine_lib.Engine):
        self.registry = prometheus_client.CollectorRegistry()
        r = self.registry
        self.requests = prometheus_client.Counter("lm_requests", "HTTP requests.", ["endpoint", "status"], registry=r)
        self.prompt_tokens = prometheus_client.Counter("lm_prompt_tokens", "Prompt tokens admitted.", registry=r)
        self.generated_tokens = prometheus_client.Counter("lm_generated_tokens", "Tokens generated.", registry=r)
        self.cancelled = prometheus_client.Counter(
            "lm_cancelled_requests", "Requests stopped early: a client went away, or a stop string ended them.",
            registry=r)
        self.first_token = prometheus_client.Histogram(
            "lm_time_to_first_token_seconds", "From a request's arrival to its first token.", registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.tokens_per_second = prometheus_client.Gauge(
            "lm_generated_tokens_per_second", "Tokens generated per second over the last 10 s.", registry=r)
        gauge = lambda name, text, read: prometheus_client.Gauge(name, text, registry=r).set_function(read)
        gauge("lm_queue_depth", "Requests waiting for an engine row.", engine.queue_depth)
        gauge("lm_running_requests", "Requests holding an engine row.",
              lambda: sum(row is not None for row in engine.rows))
        self.recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens), last 10 s.
        self.recent_tokens = 0

    def generated(self, count: int) -> None:
        if not count:
            return
        self.generated_tokens.inc(count)
        now = time.monotonic()
        self.recent.append((now, count))
        self.recent_tokens += count
        while now - self.recent[0][0] >= 10.0:
            self.recent_tokens -= self.recent.popleft()[1]
        self.tokens_per_second.set(self.recent_tokens / 10.0)


class Server:
    """The engine, the tokenizer and the FastAPI app of one run (`app`)."""

    def __init__(self, config, params, tokenizer, *, model_name: str, **engine_options):
        self.config, self.tokenizer, self.model_name = config, tokenizer, model_name
        self.engine = engine_lib.Engine(config, params, **engine_options)
        self.metrics = Metrics(self.engine)
        self.stop_ids = tuple(t for t in (tokenizer.eos_id,) if t is not None)
        self.courier = _Courier()
        self.app = self._app()

    # ------------------------------------------------------------------------------------------ requests

    def prompt_ids(self, prompt) -> list[int]:
        bos = [] if self.tokenizer.bos_id is None else [self.tokenizer.bos_id]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise BadRequest("prompt: one prompt per request (use n for several completions)", "prompt")
            prompt = prompt[0]
        if not prompt:
            raise BadRequest("prompt: must not be empty", "prompt")
        return bos + self.tokenizer.encode(prompt)

    def chat_ids(self, messages: list[ChatMessage]) -> list[int]:
        from lm.data import chat, sft

        template, add_bos = sft.chat_template(self.config, self.tokenizer)
        text = chat.render(template, [m.model_dump(exclude_none=True) for m in messages],
                           self.tokenizer.special_tokens(), add_generation_prompt=True)
        bos = [self.tokenizer.bos_id] if add_bos and self.tokenizer.bos_id is not None else []
        return bos + self.tokenizer.encode(text)

    async def generate(self, ids: list[int], body: _Request, max_tokens: int, logprobs: int, index: int):
        """Yields `(text_delta, token_events, finish_reason)` as tokens arrive, one item for all the tokens that
        arrived since the consumer last asked (so a consumer that falls behind the engine catches up in one chunk,
        not one per token); cancels the request when the consumer stops (a disconnect) or a stop string appears."""
        mailbox = _Mailbox(self.courier)
        seed = (body.seed if body.seed is not None else uuid.uuid4().int % 2**31) + index
        request = engine_lib.Request(ids, max_tokens, body.sampling(), self.stop_ids, seed, logprobs,
                                     on_token=mailbox.post)
        try:
            self.engine.submit(request)
        except ArgumentError as error:
            raise BadRequest(str(error), "max_tokens" if "max_tokens" in str(error) else "prompt") from None
        self.metrics.prompt_tokens.inc(len(ids))
        arrived, stops = time.monotonic(), body.stops()
        reply, sent = _Detokenizer(self.tokenizer), ""
        longest_stop = max((len(s) for s in stops), default=0)
        finished = False
        try:
            while True:
                events = await mailbox.get()
                # A stop string must end the reply at the token that completes it, so with stop strings each
                # token's text is matched on its own.
                for group in [[event] for event in events] if stops else [events]:
                    tokens = [event for event in group if event.token is not None]
                    if tokens and not reply.tokens:
                        self.metrics.first_token.observe(time.monotonic() - arrived)
                    self.metrics.generated(len(tokens))
                    reply.tokens.extend(e.token for e in tokens if e.token not in self.stop_ids)
                    reason = group[-1].finish_reason  # A request's finishing event is its last.
                    text = sent + reply.new_text(final=reason is not None)
                    # Only a stop string that ends in the new text can be new (the rest was searched before).
                    after = max(0, len(sent) - longest_stop + 1)
                    cut = min((i for i in (text.find(s, after) for s in stops) if i >= 0), default=-1)
                    if cut >= 0:
                        text, reason = text[:cut], "stop"
                    delta, sent = text[len(sent):], text
                    if reason is not None:
                        finished = group[-1].finish_reason is not None
                        yield delta, tokens, "length" if reason == "length" else "stop"
                        return
                    yield delta, tokens, None
        finally:
            if not finished:
                self.engine.cancel(request.id)
                self.metrics.cancelled.inc()

    # ------------------------------------------------------------------------------------------ the app

    def _app(self) -> fastapi.FastAPI:
        app = fastapi.FastAPI(title="lm")
        server = self

        @app.exception_handler(fastapi.exceptions.RequestValidationError)
        async def invalid(request, error):
            first = error.errors()[0] if error.errors() else {}
            where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
            message = first.get("msg", "invalid request")
            if first.get("type") == "json_invalid":
                message, where = "the body is not valid JSON", None
            elif first.get("type") == "extra_forbidden":
                message = f"unknown field {where!r}"
            elif where:
                message = f"{where}: {message}"
            server.metrics.requests.labels(request.url.path, "400").inc()
            return _error(400, message, where)

        @app.exception_handler(BadRequest)
        async def bad(request, error: BadRequest):
            server.metrics.requests.labels(request.url.path, str(error.status)).inc()
            return _error(error.status, error.message, error.param)

        @app.get("/health")
        async def health():
            return {"status": "ok"}

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": server.model_name, "object": "model", "owned_by": "lm"}]}

        @app.get("/metrics")
        async def metrics():
            return responses.Response(prometheus_client.generate_latest(server.metrics.registry),
                                      media_type=prometheus_client.CONTENT_TYPE_LATEST)

        @app.post("/v1/completions")
        async def completions(body: CompletionRequest, http: fastapi.Request):
            ids = server.prompt_ids(body.prompt)
            return await server.respond(http, body, ids, body.max_tokens, body.logprobs or 0, chat=False)

        @app.post("/v1/chat/completions")
        async def chat_completions(body: ChatRequest, http: fastapi.Request):
            ids = server.chat_ids(body.messages)
            max_tokens = body.max_completion_tokens or body.max_tokens or (server.engine.max_len - len(ids))
            logprobs = (body.top_logprobs or 0) if body.logprobs else 0
            if body.top_logprobs and not body.logprobs:
                raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
            return await server.respond(http, body, ids, max_tokens, logprobs, chat=True, want_logprobs=body.logprobs)

        return app

    async def respond(self, http, body: _Request, ids, max_tokens, logprobs: int, *, chat: bool,
                      want_logprobs: bool | None = None):
        if max_tokens < 1:
            raise BadRequest(f"the prompt ({len(ids)} tokens) leaves no room in the context of "
                             f"{self.engine.max_len} tokens", "messages")
        want_logprobs = (body.logprobs is not None) if want_logprobs is None else want_logprobs
        created, name = int(time.time()), body.model or self.model_name
        completion_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        kind = "chat.completion" if chat else "text_completion"
        streams = [self.generate(ids, body, max_tokens, logprobs, i) for i in range(body.n)]
        try:
            first = await asyncio.gather(*(anext(s) for s in streams))  # Submits every choice; surfaces 4xx.
        except BadRequest:
            for s in streams:
                await s.aclose()
            raise
        endpoint = http.url.path
        if body.stream:
            async def events():
                try:
                    if chat:
                        for i in range(body.n):
                            yield _sse(self._chunk(completion_id, created, name, i, {"role": "assistant",
                                                                                     "content": ""}, None, chat))
                    async for i, delta, tokens, reason in _merged(streams, first):
                        piece = self._logprobs(tokens, chat) if want_logprobs and tokens else None
                        payload = {"content": delta} if chat else delta
                        yield _sse(self._chunk(completion_id, created, name, i, payload, reason, chat, piece))
                    yield "data: [DONE]\n\n"
                    self.metrics.requests.labels(endpoint, "200").inc()
                finally:
                    for s in streams:
                        await s.aclose()  # A disconnect: cancels the engine requests still running.

            return responses.StreamingResponse(events(), media_type="text/event-stream")
        collecting = asyncio.ensure_future(asyncio.gather(*(_collect(s, h) for s, h in zip(streams, first))))
        while not collecting.done():  # A client that goes away cancels its requests.
            await asyncio.wait([collecting], timeout=0.25)
            if not collecting.done() and await http.is_disconnected():
                collecting.cancel()
        try:
            collected = collecting.result()
        finally:
            for s in streams:
                await s.aclose()
        choices, generated = [], 0
        for i, (text, tokens, reason) in enumerate(collected):
            generated += len(tokens)
            logprobs_field = self._logprobs(tokens, chat) if want_logprobs else None
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "logprobs": logprobs_field, "finish_reason": reason})
            else:
                choices.append({"index": i, "text": text, "logprobs": logprobs_field, "finish_reason": reason})
        self.metrics.requests.labels(endpoint, "200").inc()
        return {"id": completion_id, "object": kind, "created": created, "model": name, "choices": choices,
                "usage": {"prompt_tokens": len(ids), "completion_tokens": generated,
                          "total_tokens": len(ids) + generated}}

    def _chunk(self, completion_id, created, name, index, payload, reason, chat, logprobs=None) -> dict:
        choice = {"index": index, "finish_reason": reason, "logprobs": logprobs}
        choice.update({"delta": payload} if chat else {"text": payload})
        return {"id": completion_id, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created, "model": name, "choices": [choice]}

    def _logprobs(self, events, chat: bool):
        """OpenAI's logprobs object of these tokens (chat: `content` entries; completions: parallel lists)."""
        piece = lambda token: self.tokenizer.decode([token])
        if chat:
            return {"content": [{"token": piece(e.token), "logprob": e.logprob, "bytes": list(piece(e.token).encode()),
                                 "top_logprobs": [{"token": piece(t), "logprob": lp, "bytes": list(piece(t).encode())}
                                                  for t, lp in e.top_logprobs]} for e in events]}
        return {"tokens": [piece(e.token) for e in events], "token_logprobs": [e.logprob for e in events],
                "top_logprobs": [{piece(t): lp for t, lp in e.top_logprobs} for e in events],
                "text_offset": []}


class _Courier:
    """Carries the engine thread's events to the server's event loop, waking the loop once for all the events posted
    before it runs: one wake-up (a write to the loop's pipe, and a pass of the loop) per engine step, not per token."""

    def __init__(self):
        self.lock = threading.Lock()
        self.parcels: list[tuple[object, engine_lib.Event]] = []

    def post(self, loop: asyncio.AbstractEventLoop, deliver, event: engine_lib.Event) -> None:
        """From the engine's thread: `deliver(event)` runs on `loop` soon."""
        with self.lock:
            self.parcels.append((deliver, event))
            if len(self.parcels) > 1:
                return  # The wake-up the first parcel asked for has not run yet; it will deliver this one too.
        loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            parcels, self.parcels = self.parcels, []
        for deliver, event in parcels:
            deliver(event)


class _Mailbox:
    """One request's events: posted from the engine's thread, taken by the request's coroutine all at once."""

    def __init__(self, courier: _Courier):
        self.courier, self.loop = courier, asyncio.get_running_loop()
        self.events: list[engine_lib.Event] = []
        self.ready = asyncio.Event()

    def post(self, event: engine_lib.Event) -> None:
        self.courier.post(self.loop, self._receive, event)

    def _receive(self, event: engine_lib.Event) -> None:
        self.events.append(event)
        self.ready.set()

    async def get(self) -> list[engine_lib.Event]:
        """Every event posted since the last call (waits for at least one)."""
        await self.ready.wait()
        self.ready.clear()
        events, self.events = self.events, []
        return events


class _Detokenizer:
    """A reply's text, decoded a few tokens at a time (vLLM's incremental detokenization): each call decodes the
    tokens since the last stable point with a few before them for context, so a reply of n tokens costs O(n), not
    the O(n^2) of decoding it whole per token. A sentencepiece token's leading space or a multi-byte character split
    over tokens decodes exactly as in the whole reply's `decode`."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prefix = 0  # Context tokens before the unread ones; their text is already out.
        self.read = 0  # Tokens whose text is out.

    def new_text(self, final: bool = False) -> str:
        """The text the tokens appended since the last call add. An incomplete UTF-8 character (decoded as U+FFFD)
        waits for its other bytes unless `final`."""
        if self.read == len(self.tokens):
            return ""
        before = self.tokenizer.decode(self.tokens[self.prefix:self.read])
        text = self.tokenizer.decode(self.tokens[self.prefix:])
        if text.endswith("\ufffd") and not final:
            return ""
        self.prefix, self.read = self.read, len(self.tokens)
        return text[len(before):]


async def _collect(stream, head) -> tuple[str, list, str]:
    """`(text, token_events, finish_reason)` of a choice's stream whose first item is `head`."""
    text, tokens, reason = head
    tokens = list(tokens)
    if reason is None:
        async for delta, more, reason in stream:
            text += delta
            tokens += more
    return text, tokens, reason


async def _merged(streams, first):
    """`(choice, text_delta, token_events, finish_reason)` of every choice's stream (whose first items are
    `first`) as they come; one choice's directly, several through tasks that feed one queue."""
    if len(streams) == 1:  # (A stream that has finished ends at once.)
        yield (0, *first[0])
        async for item in streams[0]:
            yield (0, *item)
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, stream, head):
        await queue.put((i, *head))
        async for item in stream:
            await queue.put((i, *item))
        await queue.put(None)

    tasks = [asyncio.create_task(pump(i, s, h)) for i, (s, h) in enumerate(zip(streams, first))]
    try:
        done = 0
        while done < len(streams):
            item = await queue.get()
            if item is None:
                done += 1
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Run directory holding config.json, tokenizer and checkpoints/.",
                        required=True)
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
    flags.DEFINE_integer("port", 8000, "Port to listen on.")
    flags.DEFINE_integer("slots", 8, "Requests decoded at once (engine rows).")
    flags.DEFINE_integer("page_size", 16, "Tokens per KV-cache page.")
    flags.DEFINE_integer("chunk", 64, "Prompt tokens a row prefills per step.")
    flags.DEFINE_enum("policy", "continuous", ["continuous", "static"],
                      "Batching: continuous, or static (the baseline: a new batch once the last has finished).")


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    restored = checkpoint.restore(FLAGS.workdir, FLAGS.step)
    tokenizer = tokenizer_lib.from_workdir(FLAGS.workdir)
    server = Server(restored.config, restored.params, tokenizer, model_name=FLAGS.workdir.rstrip("/").split("/")[-1],
                    slots=FLAGS.slots, page_size=FLAGS.page_size, chunk=FLAGS.chunk, policy=FLAGS.policy)
    server.engine.start()
    print(f"lm.serve: {FLAGS.workdir} (step {restored.step}) on http://{FLAGS.host}:{FLAGS.port}", flush=True)
    uvicorn.run(server.app, host=FLAGS.host, port=FLAGS.port, log_level="warning")


if __name__ == "__main__":
    from lm import cli

    define_flags()
    cli.run(main)
