"""Llama-3.2-1B shapes: 16 layers, d_model 2048, 32 query / 8 KV heads (GQA), SwiGLU 8192, RoPE theta 5e5, tied.

Runs on accelerators; on CPU it is for abstract evaluation (`jax.eval_shape`) and the pre-flight check. The Llama-3.1
RoPE frequency scaling for long context is not applied (it only matters beyond the 8192 pretraining length).
"""

from lm import config as lm_config


def get_config():
    c = lm_config.base_config()
    m = c.model
    m.vocab_size = 128_256
    m.d_model = 2048
    m.num_layers = 16
    m.num_heads = 32
    m.num_kv_heads = 8
    m.mlp_dim = 8192
    m.max_seq_len = 8192
    m.rope_theta = 500_000.0
    m.norm_eps = 1e-5
    m.tie_embeddings = True
    m.remat_policy = "dots_no_batch"
    c.data.seq_len = 4096
    c.data.batch_size = 256
    c.data.tokenizer.vocab_size = 128_256
    c.optim.learning_rate = 3e-4
    c.optim.warmup_steps = 2000
    c.total_steps = 100_000
    c.eval_every = 1000
    c.checkpoint_every = 1000
    return c
