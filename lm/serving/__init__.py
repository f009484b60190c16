"""Serving: a paged KV cache with continuous batching (`engine`), and the OpenAI-compatible HTTP server on it
(`lm.serve`)."""
