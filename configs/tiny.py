"""A small RoPE/RMSNorm/SwiGLU model that trains on 2 CPU cores in minutes on the built-in corpus (the README default)."""

from lm import config as lm_config


def get_config():
    c = lm_config.base_config()
    c.model.vocab_size = 2048
    c.model.d_model = 256
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.model.mlp_dim = 512
    c.model.max_seq_len = 256
    c.model.dtype = "float32"  # CPUs have no fast bf16 matmul.
    c.model.remat_policy = "none"
    c.data.source = "default"
    c.data.seq_len = 128
    c.data.batch_size = 16
    c.data.tokenizer.vocab_size = 2048
    c.loss.chunk_size = 1024
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 50
    c.total_steps = 900
    c.log_every = 10
    c.eval_every = 300
    c.eval_steps = 10
    c.checkpoint_every = 300
    return c
