"""How a token is drawn from a model's logits, on device, inside the decode loops (`lm.generate`, `lm.speculative`,
`lm.serving`).

The logits of each row pass, in this order (Hugging Face's and vLLM's order):

1. repetition control, from the row's text so far (`Context`):
   - repetition penalty (CTRL, Keskar et al. 2019): the logit of every token already in the row (prompt or
     reply) is divided by the penalty if positive, multiplied by it if negative;
   - frequency and presence penalties (OpenAI's): `count * frequency + (count > 0) * presence` is subtracted from
     the logit of each token, counted in the reply only;
   - `no_repeat_ngram_size` n: a token that would complete an n-gram already in the row is removed;
2. temperature: 0 is greedy (the argmax of the controlled logits); otherwise logits are divided by it;
3. top-k keeps the k most likely tokens; top-p (nucleus) the smallest set of the rest whose probability reaches p;
   min-p those whose probability is at least `min_p` times the most likely one's.

`distribution` returns the resulting distribution as logits (`-inf` for removed tokens; a greedy row's is one-hot):
speculative decoding needs the draft's and the target's exact distributions, and sampling is one categorical draw
from it. Stop strings are matched on the bytes of the reply (`StopStrings`).
"""

from __future__ import annotations

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np

from lm.errors import ArgumentError


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How a token is drawn (module docstring). Every default is off: temperature 0 (greedy), top_k 0, top_p 1,
    min_p 0, repetition_penalty 1, frequency and presence penalties 0, no_repeat_ngram_size 0."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    no_repeat_ngram_size: int = 0

    def __post_init__(self):
        checks = [
            ("temperature", self.temperature >= 0, ">= 0 (0 = greedy)"),
            ("top_k", self.top_k >= 0, ">= 0 (0 = off)"),
            ("top_p", 0.0 < self.top_p <= 1.0, "in (0, 1] (1 = off)"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "in [0, 1] (0 = off)"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0 (1 = off)"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "in [-2, 2] (0 = off)"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "in [-2, 2] (0 = off)"),
            ("no_repeat_ngram_size", self.no_repeat_ngram_size >= 0, ">= 0 (0 = off)"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ArgumentError(f"{name} must be {expected}, got {getattr(self, name)}")

    @property
    def reads_context(self) -> bool:
        """Whether the row's text so far changes the distribution (any repetition control is on)."""
        return (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
                or self.no_repeat_ngram_size > 0)


@flax.struct.dataclass
class Context:
    """Each row's text so far, for repetition control: the tokens of the row's cache slots.

    tokens_bs: int32 `[batch, slots]`, slot s of row b holding the token the cache holds there.
    start_b: int32 `[batch]`, the first slot of text (left padding before it).
    reply_start_b: int32 `[batch]`, the first slot of the reply (the prompt before it).
    length_b: int32 `[batch]`, the slots written; the token being drawn goes to slot `length_b`.
    """

    tokens_bs: jax.Array
    start_b: jax.Array
    reply_start_b: jax.Array
    length_b: jax.Array

    def counts(self, vocab: int) -> tuple[jax.Array, jax.Array]:
        """fp32 `[batch, vocab]` counts of each token in the row's text (prompt and reply) and in its reply."""
        slot_s = jnp.arange(self.tokens_bs.shape[1])
        written_bs = slot_s < self.length_b[:, None]
        text_bs = written_bs & (slot_s >= self.start_b[:, None])
        reply_bs = written_bs & (slot_s >= self.reply_start_b[:, None])
        row_bs = jnp.broadcast_to(jnp.arange(self.tokens_bs.shape[0])[:, None], self.tokens_bs.shape)
        count = lambda in_bs: jnp.zeros((self.tokens_bs.shape[0], vocab), jnp.float32).at[
            row_bs, self.tokens_bs].add(in_bs.astype(jnp.float32))
        return count(text_bs), count(reply_bs)

    def repeated_ngram_ends(self, n: int, vocab: int) -> jax.Array:
        """bool `[batch, vocab]`: the tokens that would complete an n-gram already in the row's text, i.e. that
        followed an earlier occurrence of the row's last n - 1 tokens."""
        slots = self.tokens_bs.shape[1]
        slot_s = jnp.arange(slots)
        # The n - 1 tokens before each slot j, and the row's last n - 1 tokens (before slot length_b).
        before_bsi = jnp.stack([jnp.roll(self.tokens_bs, n - 1 - i, axis=1) for i in range(n - 1)], axis=-1)
        last_slot_bi = self.length_b[:, None] - (n - 1) + jnp.arange(n - 1)
        last_bi = jnp.take_along_axis(self.tokens_bs, jnp.clip(last_slot_bi, 0, slots - 1), axis=1)
        earlier_bs = ((slot_s >= self.start_b[:, None] + n - 1) & (slot_s < self.length_b[:, None])
                      & (self.length_b - self.start_b >= n - 1)[:, None])
        match_bs = jnp.all(before_bsi == last_bi[:, None, :], axis=-1) & earlier_bs
        row_bs = jnp.broadcast_to(jnp.arange(self.tokens_bs.shape[0])[:, None], self.tokens_bs.shape)
        return jnp.zeros((self.tokens_bs.shape[0], vocab), bool).at[row_bs, self.tokens_bs].max(match_bs)

    def append(self, token_b: jax.Array) -> "Context":
        """The context with `token_b` written at each row's next slot."""
        rows = jnp.arange(self.tokens_bs.shape[0])
        return self.replace(tokens_bs=self.tokens_bs.at[rows, self.length_b].set(token_b, mode="drop"),
                            length_b=self.length_b + 1)


@flax.struct.dataclass
class RowSampling:
    """`Sampling` with a setting per row, fp32 (int32 `top_k_b`) `[batch]` arrays: a server batch mixes requests
    that each ask for their own. Temperature 0 rows are greedy; every off value turns its step off for that row.
    (No-repeat n-grams are a `Sampling`-only setting.)"""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array
    frequency_penalty: jax.Array
    presence_penalty: jax.Array

    @classmethod
    def of(cls, settings: list[Sampling]) -> "RowSampling":
        """The rows' settings (each validated by `Sampling`); refuses no-repeat n-grams."""
        if any(s.no_repeat_ngram_size for s in settings):
            raise ArgumentError("no_repeat_ngram_size cannot differ per row (a Sampling-only setting)")
        column = lambda name, dtype: np.asarray([getattr(s, name) for s in settings], dtype)
        return cls(*(column(f.name, np.int32 if f.name == "top_k" else np.float32)
                     for f in dataclasses.fields(cls)))

    reads_context = True


def _off(value, off) -> bool:
    """Whether a setting is statically off (a `Sampling` scalar at its off value); per-row arrays never are."""
    return isinstance(value, (int, float)) and value == off


def _on(value, off):
    """Where a setting is on: a Python bool for a `Sampling` scalar, bool `[b, 1]` for a per-row column."""
    return value != off if isinstance(value, (int, float)) else jnp.asarray(value != off)


def _per_row(value):
    """A scalar setting as is, a per-row array `[b]` as a column `[b, 1]` that broadcasts over the vocabulary."""
    return value if isinstance(value, (int, float)) else jnp.asarray(value)[:, None]


def _where_any_row(on, step, logits_bv: jax.Array) -> jax.Array:
    """`step(logits_bv)`, skipped when `on` (a per-row bool array, or a Python bool) holds for no row. Per-row
    settings are data, so the skip is decided at run time (`lax.cond` runs one branch), keeping one compiled program:
    a server batch where no row asks for top-k or top-p never pays for their sorts of the vocabulary."""
    if isinstance(on, bool):
        return step(logits_bv) if on else logits_bv
    return jax.lax.cond(jnp.any(on), step, lambda unchanged_bv: unchanged_bv, logits_bv)


def controlled(logits_bv: jax.Array, sampling: Sampling | RowSampling, context: Context | None) -> jax.Array:
    """fp32 logits after repetition control (module docstring, step 1); unchanged when none is on."""
    logits_bv = logits_bv.astype(jnp.float32)
    if not sampling.reads_context:
        return logits_bv
    if context is None:
        raise ValueError("repetition control needs the rows' context")
    vocab = logits_bv.shape[-1]
    penalty, frequency, presence = (_per_row(getattr(sampling, name)) for name in (
        "repetition_penalty", "frequency_penalty", "presence_penalty"))
    def penalise(logits_bv):
        text_count_bv, reply_count_bv = context.counts(vocab)
        penalised_bv = jnp.where(logits_bv > 0, logits_bv / penalty, logits_bv * penalty)
        logits_bv = jnp.where(text_count_bv > 0, penalised_bv, logits_bv)
        return logits_bv - frequency * reply_count_bv - presence * (reply_count_bv > 0)

    if not (_off(penalty, 1.0) and _off(frequency, 0.0) and _off(presence, 0.0)):
        logits_bv = _where_any_row(_on(penalty, 1.0) | _on(frequency, 0.0) | _on(presence, 0.0), penalise, logits_bv)
    n = getattr(sampling, "no_repeat_ngram_size", 0)
    if n:
        logits_bv = jnp.where(context.repeated_ngram_ends(n, vocab), -jnp.inf, logits_bv)
    return logits_bv


def _one_hot_argmax(logits_bv: jax.Array) -> jax.Array:
    """Log-weights of the greedy choice: 0 at each row's argmax, `-inf` elsewhere."""
    best_b = jnp.argmax(logits_bv, axis=-1)
    return jnp.where(jnp.arange(logits_bv.shape[-1]) == best_b[:, None], 0.0, -jnp.inf)


def distribution(logits_bv: jax.Array, sampling: Sampling | RowSampling, context: Context | None = None) -> jax.Array:
    """fp32 `[batch, vocab]` log-weights of the distribution a token is drawn from (`-inf` for removed tokens; a
    greedy row's is 0 at the argmax and `-inf` elsewhere). Normalise with `jax.nn.softmax` for probabilities.
    Steps that `sampling` turns off statically are not computed."""
    logits_bv = controlled(logits_bv, sampling, context)
    temperature, top_k, top_p, min_p = (_per_row(getattr(sampling, name)) for name in (
        "temperature", "top_k", "top_p", "min_p"))
    if _off(temperature, 0.0):
        return _one_hot_argmax(logits_bv)
    greedy_b1 = None if isinstance(temperature, (int, float)) else temperature == 0.0
    controlled_bv = logits_bv
    logits_bv = logits_bv / (temperature if greedy_b1 is None else jnp.where(greedy_b1, 1.0, temperature))
    if isinstance(top_k, int) and top_k:
        kth_largest_b1 = jax.lax.top_k(logits_bv, top_k)[0][:, -1:]
        logits_bv = jnp.where(logits_bv < kth_largest_b1, -jnp.inf, logits_bv)
    elif not isinstance(top_k, int):
        def keep_top_k(logits_bv):
            sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
            kth_largest_b1 = jnp.take_along_axis(sorted_bv, jnp.clip(top_k - 1, 0, logits_bv.shape[-1] - 1), axis=-1)
            return jnp.where((top_k > 0) & (logits_bv < kth_largest_b1), -jnp.inf, logits_bv)

        logits_bv = _where_any_row(top_k > 0, keep_top_k, logits_bv)

    def keep_top_p(logits_bv):
        sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
        probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
        # Keep a token while the mass of the more likely ones is still short of p: the smallest set reaching p.
        mass_before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
        kept_b1 = jnp.sum(mass_before_bv < top_p, axis=-1, keepdims=True)
        threshold_b1 = jnp.take_along_axis(sorted_bv, kept_b1 - 1, axis=-1)
        return jnp.where((top_p < 1.0) & (logits_bv < threshold_b1), -jnp.inf, logits_bv)

    if not _off(top_p, 1.0):
        logits_bv = _where_any_row(_on(top_p, 1.0), keep_top_p, logits_bv)
    if not _off(min_p, 0.0):
        # p >= min_p * p_max  <=>  logit >= max logit + log(min_p).
        floor_b1 = jnp.max(logits_bv, axis=-1, keepdims=True) + jnp.log(min_p)
        logits_bv = jnp.where(logits_bv < floor_b1, -jnp.inf, logits_bv)
    if greedy_b1 is not None:
        logits_bv = jnp.where(greedy_b1, _one_hot_argmax(controlled_bv), logits_bv)
    return logits_bv


def sample(logits_bv: jax.Array, rng: jax.Array, sampling: Sampling | RowSampling,
           context: Context | None = None) -> jax.Array:
    """int32 `[batch]` tokens drawn from fp32 `logits_bv` `[batch, vocab]` as `sampling` says."""
    if _off(sampling.temperature, 0.0):
        return jnp.argmax(controlled(logits_bv, sampling, context), axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, distribution(logits_bv, sampling, context), axis=-1).astype(jnp.int32)


@flax.struct.dataclass
class StopStrings:
    """Stop strings matched on device against the bytes of each row's reply, however the reply was tokenised.

    token_bytes_vm: uint8 `[vocab, m]` the bytes each token stands for, left-aligned (m: the longest token's).
    token_lengths_v: int32 `[vocab]` how many of them are real.
    stops_zm: uint8 `[stops, z]` the stop strings' bytes, right-aligned; `stop_lengths_z` int32 `[stops]`.
    """

    token_bytes_vm: jax.Array
    token_lengths_v: jax.Array
    stops_zm: jax.Array
    stop_lengths_z: jax.Array

    @classmethod
    def build(cls, stops: list[str], token_byte_strings: list[bytes]) -> "StopStrings":
        """Tables for `stops` (non-empty strings) under a tokenizer whose token i stands for `token_byte_strings[i]`
        (`lm.data.tokenizer.Tokenizer.token_byte_strings`)."""
        encoded = [s.encode("utf-8") for s in stops]
        if not encoded or any(not s for s in encoded):
            raise ArgumentError(f"stop strings must be non-empty, got {stops!r}")
        width = max(1, max(len(b) for b in token_byte_strings))
        token_bytes = np.zeros((len(token_byte_strings), width), np.uint8)
        for i, piece in enumerate(token_byte_strings):
            token_bytes[i, :len(piece)] = np.frombuffer(piece, np.uint8)
        longest = max(len(s) for s in encoded)
        stop_table = np.zeros((len(encoded), longest), np.uint8)
        for i, s in enumerate(encoded):
            stop_table[i, longest - len(s):] = np.frombuffer(s, np.uint8)
        return cls(jnp.asarray(token_bytes), jnp.asarray([len(b) for b in token_byte_strings], jnp.int32),
                   jnp.asarray(stop_table), jnp.asarray([len(s) for s in encoded], jnp.int32))

    def window(self) -> int:
        """Bytes of reply tail to keep: enough for a stop string ending anywhere in the newest token."""
        return self.stops_zm.shape[1] + self.token_bytes_vm.shape[1]

    def empty_tail(self, batch: int) -> tuple[jax.Array, jax.Array]:
        """`(tail_bw, filled_b)`: no reply bytes yet."""
        return jnp.zeros((batch, self.window()), jnp.uint8), jnp.zeros((batch,), jnp.int32)

    def push(self, tail_bw: jax.Array, filled_b: jax.Array, token_b: jax.Array) -> tuple[jax.Array, jax.Array,
                                                                                         jax.Array]:
        """Appends each row's token bytes to its reply tail; returns `(tail_bw, filled_b, stopped_b)`, `stopped_b`
        true where a stop string now ends within the newest token's bytes."""
        w, m = tail_bw.shape[1], self.token_bytes_vm.shape[1]
        length_b = self.token_lengths_v[token_b]
        # Shift each row left by its token's length and write the token's bytes at the end.
        joined_bx = jnp.concatenate([tail_bw, self.token_bytes_vm[token_b]], axis=1)  # [b, w + m]
        take_bw = jnp.arange(w)[None, :] + length_b[:, None]
        # Bytes of the token sit at [w, w + length); the new tail is joined[length : length + w].
        tail_bw = jnp.take_along_axis(joined_bx, take_bw, axis=1)
        filled_b = jnp.minimum(filled_b + length_b, w)
        # A stop string of length L ends at tail position e (exclusive end) with w - length_b < e <= w.
        z = self.stops_zm.shape[1]
        end_e = jnp.arange(w - m + 1, w + 1)  # Candidate ends, within the last m bytes.
        starts_ez = end_e[:, None] - z + jnp.arange(z)[None, :]
        windows_bez = tail_bw[:, jnp.clip(starts_ez, 0, w - 1)]  # [b, ends, z]
        equal_bzez = windows_bez[:, None] == self.stops_zm[None, :, None, :]
        real_sz = jnp.arange(z)[None, :] >= (z - self.stop_lengths_z)[:, None]  # The right-aligned real bytes.
        matches_bze = jnp.all(equal_bzez | ~real_sz[None, :, None, :], axis=-1)
        in_token_be = end_e[None, :] > (w - length_b)[:, None]
        long_enough_bze = (end_e[None, None, :] - self.stop_lengths_z[None, :, None]
                           >= (w - filled_b)[:, None, None])
        stopped_b = jnp.any(matches_bze & in_token_be[:, None, :] & long_enough_bze, axis=(1, 2))
        return tail_bw, filled_b, stopped_b


@flax.struct.dataclass
class Stops:
    """What ends a row: a token of `stop_ids` (int32 `[z]`, EOS among them) or a stop string (`strings`, with each
    row's reply tail `tail_bw` and its filled bytes `filled_b`)."""

    stop_ids: jax.Array
    strings: StopStrings | None
    tail_bw: jax.Array | None
    filled_b: jax.Array | None

    @classmethod
    def start(cls, stop_ids: tuple[int, ...], strings: StopStrings | None, batch: int) -> "Stops":
        tail = (None, None) if strings is None else strings.empty_tail(batch)
        return cls(jnp.asarray(stop_ids, jnp.int32), strings, *tail)

    def push(self, token_b: jax.Array, live_b: jax.Array) -> tuple["Stops", jax.Array]:
        """Reads each live row's new token; returns the state and bool `[batch]`: the token ends its row."""
        stopped_b = jnp.isin(token_b, self.stop_ids)
        if self.strings is None:
            return self, stopped_b & live_b
        tail_bw, filled_b, string_b = self.strings.push(self.tail_bw, self.filled_b, token_b)
        state = self.replace(tail_bw=jnp.where(live_b[:, None], tail_bw, self.tail_bw),
                             filled_b=jnp.where(live_b, filled_b, self.filled_b))
        return state, (stopped_b | string_b) & live_b


def start_context(prompt_bt: jax.Array, start_b: jax.Array, max_new_tokens: int, extra: int = 0) -> Context:
    """The rows' context before their replies: the prompts at slots `[0, prompt length)`, room for
    `max_new_tokens + extra` more."""
    batch, prompt_length = prompt_bt.shape
    tokens_bs = jnp.concatenate([prompt_bt, jnp.zeros((batch, max_new_tokens + extra), jnp.int32)], axis=1)
    full_b = jnp.full((batch,), prompt_length, jnp.int32)
    return Context(tokens_bs, start_b, full_b, full_b)
