"""lm: decoder-only language models in JAX/Flax."""
