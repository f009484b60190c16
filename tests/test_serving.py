"""The continuous-batching engine (`lm.serving.engine`): paged decoding gives the contiguous cache's tokens for
every request of a mixed trace, alone or in a busy batch; nothing compiles after warm-up; seeds are per request;
cancelling frees a row; bad requests are refused in one line."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from lm import config as lm_config
from lm import generate
from lm import model as model_lib
from lm.sampling import Sampling
from lm.serving import engine as engine_lib

EOS = 3


@pytest.fixture(scope="module")
def small():
    config = lm_config.load("configs/tiny.py", **{
        "model.num_layers": 2, "model.d_model": 64, "model.num_heads": 4, "model.num_kv_heads": 2,
        "model.mlp_dim": 128, "model.vocab_size": 64, "model.max_seq_len": 96, "model.init_std": 0.1})
    return config, nn.unbox(model_lib.init(model_lib.build(config), jax.random.key(1)))


def trace(count, seed=0):
    rng = np.random.default_rng(seed)
    return [engine_lib.Request(rng.integers(4, 64, rng.integers(1, 40)).tolist(), int(rng.integers(1, 30)),
                               stop_ids=(EOS,)) for _ in range(count)]


def serve(engine, requests):
    """Runs `requests` through `engine` to the end: each request's tokens and finish reason, in request order."""
    got = {r.id: [] for r in requests}
    finished = {}

    def collect(event):
        if event.token is not None:
            got[event.request_id].append(event.token)
        if event.finish_reason:
            finished[event.request_id] = event.finish_reason

    for request in requests:
        request.on_token = collect
        engine.submit(request)
    engine.run_until_done()
    return [(got[r.id], finished[r.id]) for r in requests]


def test_paged_continuous_batching_gives_each_request_its_contiguous_cache_tokens(small):
    config, params = small
    requests = trace(12)
    engine = engine_lib.Engine(config, params, slots=4, page_size=8, chunk=8)
    busy = serve(engine, requests)
    for request, (tokens, reason) in zip(requests, busy):
        want = generate.generate(config, params, [request.prompt], max_new_tokens=request.max_tokens,
                                 eos_id=EOS)[0]
        assert tokens == want, request.prompt
        assert reason == ("stop" if want[-1] == EOS else "length")
    assert engine.compiled_programs() == 2  # [1, chunk] for a prefilling row, [slots, 1] for decoding rows.
    # Each request alone in the engine: the same tokens; and nothing compiles again.
    for request in requests[:4]:
        alone = serve(engine, [engine_lib.Request(request.prompt, request.max_tokens, stop_ids=(EOS,))])
        assert alone[0] == busy[requests.index(request)]
    assert engine.compiled_programs() == 2
    assert len(engine.free_pages) == engine.cache.key_lbsgh.shape[1] - 1  # Every page back but page 0.


def test_sampled_tokens_depend_on_the_request_seed_not_the_batch(small):
    config, params = small
    settings = Sampling(temperature=1.0, top_p=0.9, repetition_penalty=1.2)
    request = lambda seed: engine_lib.Request([5, 6, 7, 8], 20, sampling=settings, seed=seed, logprobs=3)
    engine = engine_lib.Engine(config, params, slots=4, page_size=8, chunk=8)
    (alone, _), = serve(engine, [request(1)])
    together = serve(engine, [*trace(3, seed=2), request(1), request(2)])
    assert together[3][0] == alone and together[4][0] != alone


def test_log_probabilities_are_the_models(small):
    config, params = small
    model = model_lib.build(config)
    engine = engine_lib.Engine(config, params, slots=2, page_size=8, chunk=8)
    events = []
    request = engine_lib.Request([9, 10, 11], 3, logprobs=5, on_token=events.append)
    engine.submit(request)
    engine.run_until_done()
    tokens = request.prompt + [e.token for e in events]
    hidden = model.apply({"params": params}, np.asarray([tokens[:-1]]))
    logprobs_tv = np.asarray(jax.nn.log_softmax(model.apply({"params": params}, hidden, method=model.logits)))[0]
    for i, event in enumerate(events):
        position = len(request.prompt) - 1 + i
        np.testing.assert_allclose(event.logprob, logprobs_tv[position, event.token], atol=1e-4)
        assert [t for t, _ in event.top_logprobs] == np.argsort(-logprobs_tv[position])[:5].tolist()
        assert event.top_logprobs[0][0] == event.token  # Greedy: the chosen token is the likeliest.


def test_cancelling_frees_the_row_and_bad_requests_are_refused(small):
    config, params = small
    engine = engine_lib.Engine(config, params, slots=1, page_size=8, chunk=8)
    events = []
    first = engine_lib.Request([5, 6], 50, on_token=events.append)
    second = engine_lib.Request([7, 8], 2, on_token=events.append)
    engine.submit(first)
    engine.submit(second)
    engine.step()
    engine.step()
    assert engine.queue_depth() == 1  # One row: the second waits.
    engine.cancel(first.id)
    engine.run_until_done()
    finishes = [(e.request_id, e.finish_reason) for e in events if e.finish_reason]
    assert finishes == [(first.id, "cancelled"), (second.id, "length")]
    for bad, message in [(dict(prompt=[]), "prompt: at least one token"), (dict(max_tokens=0), "max_tokens must be"),
                         (dict(max_tokens=95), "exceeds the context of 96 tokens"),
                         (dict(prompt=[64]), r"token ids must be in \[0, 64\)"), (dict(logprobs=21), "logprobs")]:
        fields = {"prompt": [1, 2], "max_tokens": 4, **bad}
        with pytest.raises(engine_lib.ArgumentError, match=message):
            engine.submit(engine_lib.Request(**fields))


@pytest.mark.parametrize("policy", ["continuous", "static"])
def test_continuous_batching_refills_a_row_at_once_and_static_waits_for_the_batch(small, policy):
    config, params = small
    engine = engine_lib.Engine(config, params, slots=2, page_size=8, chunk=8, policy=policy)
    order = []
    requests = [engine_lib.Request([5, 6, 7], n, on_token=lambda e: order.append(e.request_id)) for n in (2, 12, 2)]
    for request in requests:
        engine.submit(request)
    engine.run_until_done()
    short, long_, late = (r.id for r in requests)
    first_of_late, last_of_long = order.index(late), len(order) - 1 - order[::-1].index(long_)
    # Continuous: the third request takes the first one's row while the long one still runs; static: after it.
    assert (first_of_late < last_of_long) == (policy == "continuous"), order
