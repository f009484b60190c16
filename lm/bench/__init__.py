"""Benchmarks that print what they measured (`python -m lm.bench.NAME`), and the batch several of them time."""

import jax
import numpy as np


def synthetic_batch(config, sharding) -> dict[str, jax.Array]:
    """One batch of random tokens in the train step's layout (one document per row), placed by `sharding`."""
    rows, length = config.data.batch_size, config.data.seq_len
    tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, (rows, length + 1), dtype=np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((rows, length), np.int32),
             "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)),
             "weights": np.ones((rows, length), np.float32)}
    return jax.device_put(batch, sharding)
