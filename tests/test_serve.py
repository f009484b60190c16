"""`python -m lm.serve` started as a real process: the official `openai` client's completions, chat and streaming;
100 concurrent requests; 4xx errors for bad requests; a disconnecting client frees its row; Prometheus metrics."""

import concurrent.futures
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import REPO, environment

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(small_run):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "lm.serve", f"--workdir={small_run}", f"--port={port}", "--slots=8", "--chunk=16"],
        cwd=REPO, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=5)
            break
        except (urllib.error.URLError, ConnectionError):
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                raise AssertionError(f"lm.serve did not start:\n{process.stdout.read()[-3000:]}")
            time.sleep(0.5)
    yield url
    process.terminate()
    process.wait(timeout=30)


def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)


def post(url, path, body: bytes):
    request = urllib.request.Request(f"{url}{path}", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def metrics(url) -> dict[str, float]:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_the_openai_client_gets_completions_chats_and_streams(server):
    api = client(server)
    completion = api.completions.create(model="lm", prompt="def main(", max_tokens=8, temperature=0)
    assert completion.choices[0].finish_reason in ("length", "stop") and completion.usage.completion_tokens >= 1
    again = api.completions.create(model="lm", prompt="def main(", max_tokens=8, temperature=0, logprobs=2)
    assert again.choices[0].text == completion.choices[0].text  # Greedy: the same text every time.
    logprobs = again.choices[0].logprobs
    assert len(logprobs.token_logprobs) == again.usage.completion_tokens
    assert all(lp <= 0 for lp in logprobs.token_logprobs) and all(len(top) == 2 for top in logprobs.top_logprobs)
    streamed = api.completions.create(model="lm", prompt="def main(", max_tokens=8, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == completion.choices[0].text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "import os"}]
    chat = api.chat.completions.create(model="lm", messages=messages, max_tokens=10, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    chunks = list(api.chat.completions.create(model="lm", messages=messages, max_tokens=10, temperature=0,
                                              stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    several = api.completions.create(model="lm", prompt="import", max_tokens=6, temperature=1.0, n=3, seed=4,
                                     frequency_penalty=0.5, presence_penalty=0.5, stop=["\n\n"])
    assert sorted(c.index for c in several.choices) == [0, 1, 2]


def test_streams_carry_the_same_choices_log_probabilities_and_stop_cuts(server):
    """A stream (whose chunks may carry several tokens each) of n choices with log-probabilities joins to the reply
    without streaming; a stop string cuts the reply where it first appears, streamed or not."""
    api = client(server)
    options = dict(model="lm", prompt="def main(", max_tokens=24, temperature=0, n=2, logprobs=1)
    whole = api.completions.create(**options)
    texts, tokens = ["", ""], [0, 0]
    for chunk in api.completions.create(**options, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            tokens[choice.index] += len(choice.logprobs.token_logprobs) if choice.logprobs else 0
    assert texts == [c.text for c in whole.choices] and sum(tokens) == whole.usage.completion_tokens
    reply = whole.choices[0].text
    stop = reply[len(reply) // 3:len(reply) // 3 + 3]
    assert stop.strip(), reply  # The test needs a reply with text to cut.
    want = reply[:reply.find(stop)]
    cut = api.completions.create(**options, stop=[stop])
    assert [c.text for c in cut.choices] == [want, want] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(chunk.choices[0].text for chunk in api.completions.create(
        **{**options, "n": 1}, stop=[stop], stream=True))
    assert streamed == want


def test_100_concurrent_requests_all_succeed(server):
    api = client(server)

    def one(i):
        return api.completions.create(model="lm", prompt=f"x = {i}", max_tokens=4 + i % 12, temperature=0.8,
                                      seed=i)

    with concurrent.futures.ThreadPoolExecutor(100) as pool:
        results = list(pool.map(one, range(100)))
    assert all(r.usage.completion_tokens >= 1 for r in results)
    values = metrics(server)
    assert values["lm_requests_total{endpoint=\"/v1/completions\",status=\"200\"}"] >= 100
    assert values["lm_queue_depth"] == 0 and values["lm_time_to_first_token_seconds_count"] >= 100


@pytest.mark.parametrize("path,body,message", [
    ("/v1/completions", b'{"prompt": "x", "max_tokens": ', "not valid JSON"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 4, "colour": "red"}', "unknown field 'colour'"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": -3}', "max_tokens"),
    ("/v1/completions", json.dumps({"prompt": "word " * 2000, "max_tokens": 4}).encode(), "exceeds the context"),
    ("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "hi"}]}', "messages.0.role"),
    ("/v1/completions", b'{"prompt": "x", "temperature": 5}', "temperature"),
])
def test_bad_requests_get_a_400_with_a_message(server, path, body, message):
    status, error = post(server, path, body)
    assert status == 400 and message in error["error"]["message"], error
    assert urllib.request.urlopen(f"{server}/health", timeout=30).status == 200  # Still serving.


def test_a_client_that_disconnects_frees_its_row(server):
    cancelled = metrics(server)["lm_cancelled_requests_total"]
    body = json.dumps({"prompt": "def ", "max_tokens": 200, "temperature": 1.0, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", int(server.rsplit(":", 1)[1]))) as connection:
        connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        received = b""
        while b"data: " not in received:  # Streaming has begun.
            chunk = connection.recv(4096)
            assert chunk, received
            received += chunk
    deadline = time.time() + 60
    while metrics(server)["lm_running_requests"] > 0:
        assert time.time() < deadline, "the disconnected request still holds its row"
        time.sleep(0.2)
    assert metrics(server)["lm_cancelled_requests_total"] == cancelled + 1


def test_replies_are_detokenized_incrementally_as_decoded_whole(small_run):
    """The server decodes a streamed reply a few tokens at a time (O(n), not O(n^2)); the pieces join to exactly the
    whole reply's decode, leading spaces and characters split over tokens included."""
    import numpy as np

    from lm.data import tokenizer as tokenizer_lib
    from lm.serve import _Detokenizer

    class StripsLeadingSpace:
        """Llama's sentencepiece decode: word pieces start with "▁", and a text's first space is dropped."""

        vocab_size = 6
        pieces = ["▁the", "▁cat", "s", "▁", "é", "."]

        def decode(self, ids):
            text = "".join(self.pieces[i] for i in ids).replace("▁", " ")
            return text[1:] if text.startswith(" ") else text

    rng = np.random.default_rng(0)
    for tokenizer in (tokenizer_lib.from_workdir(small_run), StripsLeadingSpace()):
        for trial in range(30):
            ids = rng.integers(0, tokenizer.vocab_size, 40).tolist()
            if trial == 0 and tokenizer.vocab_size > 6:
                ids = tokenizer.encode("def naïve(x):\n    return '→ ' + x  # ünïcode, spaces   and tabs\t!")
            reply, pieces = _Detokenizer(tokenizer), []
            for i, token in enumerate(ids):
                reply.tokens.append(token)
                pieces.append(reply.new_text(final=i == len(ids) - 1))
            assert "".join(pieces) == tokenizer.decode(ids), (trial, pieces)


def test_the_serving_benchmark_runs_both_policies_without_compiling_after_warm_up(small_run, run_lm):
    """`lm.bench.serve` on a trained run, shrunk: both policies stream every token of the trace through the server,
    then run it in the engine alone, and neither compiles anything after its warm-up."""
    output = run_lm("lm.bench.serve", f"--workdir={small_run}", "--requests=6", "--slots=2", "--chunk=8",
                    "--prompt_tokens=2,12", "--output_tokens=1,6").stdout
    rows = [line.split() for line in output.splitlines()
            if line.split() and line.split()[0] in ("continuous", "static") and "/" not in line]
    # Through the server, then the engine alone: each policy twice, nothing compiled after warm-up.
    assert [row[0] for row in rows] == ["continuous", "static"] * 2, output
    assert all(row[-1] == "0" and float(row[1].replace(",", "")) > 0 for row in rows), output
    assert "continuous / static throughput:" in output and "engine alone:" in output
