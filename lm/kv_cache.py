"""The KV cache that decoding writes and attends to: contiguous rows (`lm.generate`) or pages of a shared pool
(`lm.serving`).

A cache holds, per layer, the keys and values of every token run so far. Each row (one sequence being decoded) has
its own write position `index_b`: rows advance by different counts when a speculative round accepts different
numbers of drafted tokens (`lm.speculative`) or a server batch mixes prompts being prefilled with replies being
decoded (`lm.serving`). A row's slots are its token positions in order; the slots before `start_b` are left padding
that no query attends to.

Two layouts of the same slots:

- contiguous: `key_lbsgh` `[layers, batch, slots, kv_heads, head_dim]`, row b's slot s at `[:, b, s]`.
- paged (vLLM's): a pool `[layers, pages, page_size, kv_heads, head_dim]` shared by every row, and a page table
  `pages_bj` `[batch, pages per row]` naming the pool page that holds each row's slots `[j P, (j + 1) P)`. Page 0 is
  never handed out (`lm.serving.pages`): unused table entries point to it, and writes past a row's pages land in it,
  so a row can never overwrite another's tokens. Attention reads a row's pages back in order (`read`), so every
  layer computes exactly what it computes over a contiguous row.

MLA (`lm.model.LatentAttention`) keeps one array per layer: each token's key/value latent and shared rotary key,
`[..., 1, kv_lora_rank + qk_rope_head_dim]`; `value_lbsgh` is None.
"""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from lm.config import head_dim


@flax.struct.dataclass
class Slots:
    """Where one decoding call's tokens go, the same for every layer (broadcast over the layer scan).

    index_b: int32 `[batch]`, slots each row has written; its new tokens go to `index_b + [0, t)`.
    start_b: int32 `[batch]`, each row's first slot of text (left padding before it).
    pages_bj: int32 `[batch, pages per row]` pool pages of each row (paged caches), or None (contiguous).
    """

    index_b: jax.Array
    start_b: jax.Array
    pages_bj: jax.Array | None = None

    def query_slots(self, length: int) -> jax.Array:
        """int32 `[batch, length]`: the slots of the next `length` tokens of each row."""
        return self.index_b[:, None] + jnp.arange(length, dtype=jnp.int32)

    def positions(self, length: int) -> jax.Array:
        """int32 `[batch, length]`: positions of the next `length` tokens within their rows' text (0 on padding)."""
        return jnp.maximum(self.query_slots(length) - self.start_b[:, None], 0)

    def mask(self, length: int, slots: int) -> jax.Array:
        """Boolean `[batch, 1, length, slots]`: query slot q may attend key slot s when `start_b <= s <= q` (causal,
        never a row's left padding, nor slots not yet written)."""
        slot_s = jnp.arange(slots, dtype=jnp.int32)
        query_bt = self.query_slots(length)
        allowed_bts = (slot_s[None, None, :] <= query_bt[:, :, None]) & (slot_s >= self.start_b[:, None])[:, None, :]
        return allowed_bts[:, None]

    def write(self, cache_l__: jax.Array, layer: jax.Array, new_bt__: jax.Array) -> jax.Array:
        """Every layer's cache (`[layers, b, s, ...]`, or a paged pool `[layers, pages, page_size, ...]`) with layer
        `layer`'s new entries `new_bt__` `[b, t, ...]` at slots `index_b + [0, t)`. Slots past the cache's end are
        dropped (a contiguous row) or land in page 0 (a paged row), never on another slot. Only the new entries are
        written: the layer loop carries the whole cache, so XLA updates it in place instead of copying it per step."""
        slot_bt = self.query_slots(new_bt__.shape[1])
        new_bt__ = new_bt__.astype(cache_l__.dtype)
        if self.pages_bj is None:
            row_bt = jnp.broadcast_to(jnp.arange(slot_bt.shape[0])[:, None], slot_bt.shape)
            return cache_l__.at[layer, row_bt, slot_bt].set(new_bt__, mode="drop")
        page_size, row_pages = cache_l__.shape[2], self.pages_bj.shape[1]
        table_index_bt = slot_bt // page_size
        page_bt = jnp.take_along_axis(self.pages_bj, jnp.minimum(table_index_bt, row_pages - 1), axis=1)
        page_bt = jnp.where(table_index_bt < row_pages, page_bt, 0)
        return cache_l__.at[layer, page_bt, slot_bt % page_size].set(new_bt__)

    def read(self, cache_l__: jax.Array, layer: jax.Array) -> jax.Array:
        """Layer `layer` of every layer's cache as rows of slots `[b, s, ...]`: its rows (contiguous) or each row's
        pages in order (paged; only those pages are gathered)."""
        if self.pages_bj is None:
            return jax.lax.dynamic_index_in_dim(cache_l__, layer, keepdims=False)
        pages_bjP_ = cache_l__[layer, self.pages_bj]  # [b, pages per row, page_size, ...]
        b, j, page_size = pages_bjP_.shape[:3]
        return pages_bjP_.reshape(b, j * page_size, *pages_bjP_.shape[3:])


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for decoding (module docstring for the two layouts).

    key_lbsgh, value_lbsgh: `[layers, batch, slots, kv_heads, head_dim]` (contiguous) or `[layers, pages,
      page_size, kv_heads, head_dim]` (paged) in the compute dtype, logical axes `axes(cfg)`. MLA keeps one array,
      `key_lbsgh` `[..., 1, kv_lora_rank + qk_rope_head_dim]`, and `value_lbsgh` is None.
    slots: each row's write position, first slot of text and pages (`Slots`).
    prompt_end: int32 scalar, the slot after every row's prompt (slots before it hold the prompt, read by LoReFT runs
      that edit chosen positions of the prompt, `lm.peft`).
    """

    key_lbsgh: jax.Array
    value_lbsgh: jax.Array | None
    slots: Slots
    prompt_end: jax.Array

    @staticmethod
    def axes(cfg, paged: bool = False) -> tuple[str | None, ...]:
        """Logical axes of the cache arrays. MLA's single latent head is replicated over `kv_heads`' mesh axis; a
        paged pool's pages are replicated over the batch axes (any row may own any page)."""
        rows = (None, None) if paged else ("batch", "length")
        if cfg.attention_type == "mla":
            return ("layers", *rows, None, None)
        return ("layers", *rows, "kv_heads", "head_dim")

    @staticmethod
    def values_per_token(cfg) -> int:
        """Numbers the cache keeps per token per layer: `2 * kv_heads * head_dim`, or MLA's
        `kv_lora_rank + qk_rope_head_dim`."""
        if cfg.attention_type == "mla":
            return cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim
        return 2 * cfg.num_kv_heads * head_dim(cfg)

    @classmethod
    def zeros(cls, cfg, start_b: jax.Array, max_len: int, prompt_end: int | None = None) -> "KVCache":
        """An empty contiguous cache for `len(start_b)` rows of up to `max_len` slots, whose prompts end at slot
        `prompt_end` (default: every slot is prompt). `cfg`: `lm.model.model_config(config)`."""
        start_b = jnp.asarray(start_b, jnp.int32)
        key, value = cls._arrays(cfg, (start_b.shape[0], max_len), paged=False)
        return cls(key, value, Slots(jnp.zeros_like(start_b), start_b),
                   jnp.int32(max_len if prompt_end is None else prompt_end))

    @classmethod
    def paged(cls, cfg, pages: int, page_size: int, pages_bj: jax.Array, index_b: jax.Array) -> "KVCache":
        """An empty pool of `pages` pages of `page_size` slots, read through the page table `pages_bj` `[batch,
        pages per row]` by rows at write positions `index_b` (no left padding; no LoReFT prompt edits)."""
        key, value = cls._arrays(cfg, (pages, page_size), paged=True)
        index_b = jnp.asarray(index_b, jnp.int32)
        return cls(key, value, Slots(index_b, jnp.zeros_like(index_b), jnp.asarray(pages_bj, jnp.int32)),
                   jnp.int32(0))

    @classmethod
    def _arrays(cls, cfg, rows: tuple[int, int], paged: bool):
        leading = (cfg.num_layers, *rows)
        if cfg.attention_type == "mla":
            key_shape, value_shape = (*leading, 1, cls.values_per_token(cfg)), None
        else:
            key_shape = value_shape = (*leading, cfg.num_kv_heads, head_dim(cfg))
        empty = lambda shape: nn.with_logical_constraint(jnp.zeros(shape, cfg.dtype), cls.axes(cfg, paged))
        return empty(key_shape), None if value_shape is None else empty(value_shape)

    @property
    def is_paged(self) -> bool:
        return self.slots.pages_bj is not None

    @property
    def slot_count(self) -> int:
        """Slots of one row: a contiguous row's length, or a paged row's pages times the page size."""
        rows = self.slots.pages_bj.shape[1] if self.is_paged else 1
        return rows * self.key_lbsgh.shape[2]

    def with_slots(self, **changes) -> "KVCache":
        """The same arrays with `Slots` fields replaced (e.g. `index_b` rolled back after a rejected draft)."""
        return self.replace(slots=self.slots.replace(**changes))
