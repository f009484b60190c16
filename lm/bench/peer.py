"""lm's train step against a PyTorch GPT of nanoGPT's design, on identical shapes, on the CPU.

    python -m lm.bench.peer [--runs=3] [--steps=10] [--torch_compile]

Both sides train the same model: L=4 layers, d=256, 4 heads, T=256, batch 8, vocabulary 8192, a GELU MLP 4x wide,
LayerNorm, learned positions, tied embeddings, no biases, fp32, AdamW with global-norm clipping at 1.0. Each run is
a fresh subprocess (so neither side's threads or caches linger into the other's) that builds its model, takes
`--warmup` steps (compiles), then times `--steps` steps, each waited for, and reports the median step; runs
alternate lm, nanoGPT, lm, nanoGPT, ... `--runs` times. The result is the ratio of the medians over runs of lm's
tokens/s to the reference's: above 1.0, lm is faster.

The reference (`NanoGPT` below) follows nanoGPT's model.py: fused query/key/value projection,
`scaled_dot_product_attention(is_causal=True)`, exact GELU, LayerNorm without bias, the head tied to the token
embedding, `torch.optim.AdamW` and `clip_grad_norm_`. lm runs its own train step (`lm.train_step`: the blockwise
loss, ZeRO sharding annotations on one device, donation). torch is a test-only dependency (`pip install -e
'.[dev]'`); it is imported only by the reference's worker.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

from absl import app, flags

from lm import config as lm_config
from lm.bench.timing import median_seconds

LAYERS, D_MODEL, HEADS, SEQ_LEN, BATCH, VOCAB = 4, 256, 4, 256, 8, 8192

_RUNS = flags.DEFINE_integer("runs", 3, "Alternating runs of each side; the ratio is of the medians.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per run (the median step is reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps per run before timing (compilation, allocator).")
_TORCH_COMPILE = flags.DEFINE_bool("torch_compile", False, "torch.compile the reference (nanoGPT's default on GPUs).")
_WORKER = flags.DEFINE_enum("worker", None, ["lm", "nanogpt"], "Internal: run one side and print its JSON.")


def lm_config_for_benchmark():
    """configs/tiny.py's model changed to the benchmark's shape and nanoGPT's design."""
    config = lm_config.base_config()
    m = config.model
    m.vocab_size, m.d_model, m.num_layers, m.num_heads, m.num_kv_heads = VOCAB, D_MODEL, LAYERS, HEADS, HEADS
    m.mlp_dim, m.max_seq_len, m.mlp_activation, m.norm = 4 * D_MODEL, SEQ_LEN, "gelu", "layernorm"
    m.position_embedding, m.tie_embeddings, m.dtype, m.remat_policy = "learned", True, "float32", "dots"
    config.data.source, config.data.seq_len, config.data.batch_size = "synthetic", SEQ_LEN, BATCH
    config.mesh.fsdp = 1  # One device: the benchmark compares single-device steps.
    return config


def run_lm(warmup: int, steps: int) -> float:
    """Median step time of lm's train step on the benchmark's shapes (synthetic batches)."""
    import jax

    from lm import cpu
    from lm import train_step as train_step_lib
    from lm.data import pipeline

    cpu.keep_step_memory()  # As every lm program does (lm.cli.run); the reference keeps its process defaults.
    config = lm_config_for_benchmark()
    training = train_step_lib.build(config, jax.devices()[:1])
    state = training.init_state()
    train_step = training.train_step()
    iterator = pipeline.make_train_iterator(config, tokenizer=None)
    batches = [pipeline.to_global_arrays(next(iterator), training.shardings.batch) for _ in range(4)]
    count = 0

    def step():
        nonlocal state, count
        state, metrics = train_step(state, batches[count % len(batches)], {})
        jax.block_until_ready(metrics)
        count += 1

    return median_seconds(step, warmup, steps)


def run_nanogpt(warmup: int, steps: int, compile_model: bool) -> float:
    """Median step time of the PyTorch reference on the benchmark's shapes (random batches)."""
    import torch

    torch.manual_seed(0)
    model = _nanogpt_model()
    if compile_model:
        model = torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    batches = [torch.randint(0, VOCAB, (BATCH, SEQ_LEN + 1)) for _ in range(4)]
    count = 0

    def step():
        nonlocal count
        tokens = batches[count % len(batches)]
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.view(-1, VOCAB), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        count += 1

    return median_seconds(step, warmup, steps)


def _nanogpt_model():
    """nanoGPT's GPT (model.py, bias=False) at the benchmark's shapes."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = nn.Linear(D_MODEL, 3 * D_MODEL, bias=False)
            self.c_proj = nn.Linear(D_MODEL, D_MODEL, bias=False)

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = self.c_attn(x).split(d, dim=2)
            q, k, v = (a.view(b, t, HEADS, d // HEADS).transpose(1, 2) for a in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, d))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(D_MODEL, bias=False), nn.LayerNorm(D_MODEL, bias=False)
            self.attn = SelfAttention()
            self.mlp = nn.Sequential(nn.Linear(D_MODEL, 4 * D_MODEL, bias=False), nn.GELU(),
                                     nn.Linear(4 * D_MODEL, D_MODEL, bias=False))

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(VOCAB, D_MODEL), nn.Embedding(SEQ_LEN, D_MODEL)
            self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
            self.ln_f = nn.LayerNorm(D_MODEL, bias=False)
            self.lm_head = nn.Linear(D_MODEL, VOCAB, bias=False)
            self.lm_head.weight = self.wte.weight  # Tied.
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    torch.nn.init.normal_(module.weight, std=0.02)

        def forward(self, tokens):
            x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1]))
            for block in self.blocks:
                x = block(x)
            return self.lm_head(self.ln_f(x))

    return GPT()


def _worker_seconds(side: str) -> float:
    """Runs one side in a fresh subprocess; its median step time in seconds."""
    command = [sys.executable, "-m", "lm.bench.peer", f"--worker={side}", f"--steps={_STEPS.value}",
               f"--warmup={_WARMUP.value}", f"--torch_compile={_TORCH_COMPILE.value}"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"error: the {side} run failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["step_seconds"]


def main(argv) -> None:
    del argv
    if _WORKER.value is not None:
        seconds = (run_lm(_WARMUP.value, _STEPS.value) if _WORKER.value == "lm"
                   else run_nanogpt(_WARMUP.value, _STEPS.value, _TORCH_COMPILE.value))
        print(json.dumps({"step_seconds": seconds}))
        return
    tokens = BATCH * SEQ_LEN
    times = {"lm": [], "nanogpt": []}
    for run in range(_RUNS.value):
        for side in times:
            times[side].append(_worker_seconds(side))
            print(f"run {run + 1} {side}: {1e3 * times[side][-1]:.1f} ms/step, {tokens / times[side][-1]:,.0f} "
                  f"tokens/s", flush=True)
    lm_rate, reference_rate = (tokens / statistics.median(times[side]) for side in ("lm", "nanogpt"))
    print(f"L={LAYERS} d={D_MODEL} heads={HEADS} T={SEQ_LEN} batch={BATCH} V={VOCAB} fp32 AdamW; "
          f"reference {'torch.compile' if _TORCH_COMPILE.value else 'eager'}; median of {_RUNS.value} runs x "
          f"{_STEPS.value} steps")
    print(f"lm {lm_rate:,.0f} tokens/s, nanoGPT design {reference_rate:,.0f} tokens/s: lm / nanoGPT = "
          f"{lm_rate / reference_rate:.3f}")


if __name__ == "__main__":
    app.run(main)
