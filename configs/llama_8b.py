"""Llama-3-8B shapes: 32 layers, d_model 4096, 32 query / 8 KV heads (GQA), SwiGLU 14336, RoPE theta 5e5, untied.

Runs on accelerators (ZeRO stage 3 / FSDP); on CPU it is for abstract evaluation and the pre-flight check.
"""

from lm import config as lm_config


def get_config():
    c = lm_config.base_config()
    m = c.model
    m.vocab_size = 128_256
    m.d_model = 4096
    m.num_layers = 32
    m.num_heads = 32
    m.num_kv_heads = 8
    m.mlp_dim = 14_336
    m.max_seq_len = 8192
    m.rope_theta = 500_000.0
    m.norm_eps = 1e-5
    m.tie_embeddings = False
    m.remat_policy = "dots_no_batch"
    c.sharding.zero_stage = 3
    c.data.seq_len = 8192
    c.data.batch_size = 512
    # 8 micro-batches of 1 x 8192 tokens per device on 64 devices: `python -m lm.preflight --config=configs/llama_8b.py
    # --mesh=fsdp=64 --device=h100` estimates 28.8 GB per device (206 GB in one micro-batch).
    c.optim.microbatches = 8
    c.data.tokenizer.vocab_size = 128_256
    c.optim.learning_rate = 3e-4
    c.optim.warmup_steps = 2000
    c.total_steps = 100_000
    c.eval_every = 1000
    c.checkpoint_every = 1000
    return c
