"""GPT-2 small (124M): learned positions, pre-norm LayerNorm, GELU 4x MLP, biases, tied embeddings.

Shapes follow Radford et al. 2019 / the released `gpt2` checkpoint: 12 layers, 12 heads, d_model 768, context 1024,
vocabulary 50257 (not padded, so the loss exercises a last partial vocabulary chunk).
"""

from lm import config as lm_config


def get_config():
    c = lm_config.base_config()
    m = c.model
    m.vocab_size = 50257
    m.d_model = 768
    m.num_layers = 12
    m.num_heads = 12
    m.num_kv_heads = 12
    m.mlp_dim = 4 * 768
    m.max_seq_len = 1024
    m.position_embedding = "learned"
    m.norm = "layernorm"
    m.norm_eps = 1e-5
    m.norm_position = "pre"
    m.mlp_activation = "gelu"
    m.qkv_bias = m.attention_out_bias = m.mlp_bias = True
    m.tie_embeddings = True
    m.remat_policy = "dots_no_batch"
    c.data.seq_len = 1024
    c.data.batch_size = 512
    c.data.tokenizer.vocab_size = 50257
    c.optim.learning_rate = 6e-4
    c.optim.warmup_steps = 700
    c.optim.end_lr_ratio = 0.1
    c.total_steps = 20_000
    c.eval_every = 1000
    c.checkpoint_every = 1000
    return c
