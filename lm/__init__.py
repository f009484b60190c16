"""lm: decoder-only language models in JAX/Flax (see README.md and docs/architecture.md).

Axis letters. Arrays carry their axes in their names, one lowercase letter per axis (`x_btd` is `[batch, length,
d_model]`); a letter means the same axis in every module:

    b  batch rows                          n  query heads
    t  positions in a row (length)         g  key/value heads
    s  key/value positions (cache slots)   r  query heads per key/value head (n / g)
    d  model width (embed)                 h  head dimension
    f  MLP hidden width                    k  rotary frequencies (h / 2)
    v  vocabulary                          c  columns of one vocabulary block (lm.loss)
    l  layers                              m  micro-batches
    x  tokens, the batch's leading axes flattened (lm.loss)
    w  a window of seq_len + 1 tokens (lm.data)
    p  learned prefix positions (lm.peft)  a  the rank of an adapter's subspace (lm.peft, LoReFT)
    1  an axis of size one kept for broadcasting

Logical axis names for sharding (`batch`, `length`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `vocab`,
`layers`, and `expert` for mixture-of-experts weights) are the design's; `lm.sharding` maps them to the mesh axes
`data`, `fsdp`, `expert`, `tensor`. Adapters add `lora_rank` and `reft_rank`, MLA its latents `q_lora` and
`kv_lora` (no rule: replicated).
"""
