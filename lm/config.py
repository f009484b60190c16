"""The run configuration: every field with its default, one validation pass, and the copy a workdir keeps.

Config files in `configs/` start from `base_config()` and override what differs (nanodo / big_vision style), so a
field exists, with its meaning documented, in exactly one place. `validate()` is called by every entry point before
anything expensive happens; it raises `ConfigError` with a one-line message naming the field.

A run records its config in `workdir/config.json` (`write_config`); `read_config(workdir)` gives it back as a
ConfigDict over `base_config()`, which is how evaluation, sampling and resumption know what was trained.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from typing import Any

import ml_collections
from ml_collections import config_dict

from lm import attention as attention_lib
from lm import paths
from lm.errors import CheckpointError, ConfigError

CONFIG_FILE = "config.json"

# Choice fields and the values they accept; `validate()` checks against these.
CHOICES = {
    "model.position_embedding": ("rope", "learned", "sinusoidal", "relative", "alibi", "none"),
    "model.norm": ("rmsnorm", "layernorm", "scalenorm"),
    "model.attention_type": ("mha", "mla"),
    "model.moe.router": ("softmax", "sigmoid"),
    "model.norm_position": ("pre", "post"),
    "model.mlp_activation": ("swiglu", "gelu"),
    "model.rope_scaling.type": ("none", "linear", "llama3"),
    "model.attention": ("auto", "xla", "cudnn", "blockwise", "splash"),
    "model.remat_policy": ("none", "full", "dots", "dots_no_batch"),
    "model.init": ("truncated_normal", "xavier", "he"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16", "float16"),
    "data.source": ("default", "tfds", "files", "synthetic"),
    "data.format": ("text", "prompt_completion", "chat", "preference"),
    "data.overlong": ("truncate", "drop"),
    "finetune.method": ("full", "lora", "prefix", "loreft"),
    "finetune.objective": ("lm", "sft", "dpo", "reward", "ppo"),
    "finetune.dpo.loss": ("sigmoid", "ipo"),
    "finetune.dpo.reference": ("model", "precomputed"),
    "finetune.lora.init": ("a_gaussian_b_zero", "a_zero_b_gaussian", "both_gaussian"),
    "rl.kl_estimator": ("k1", "k3"),
    "optim.optimizer": ("adamw", "lion", "sgd", "adafactor"),
    "optim.schedule": ("cosine", "linear", "constant"),
}

# The projections LoRA can adapt (`lm.model`'s names): attention query, key, value, out; MLP gate, up, down.
LORA_TARGETS = ("query", "key", "value", "out", "gate", "up", "down")

# Integer fields that must be > 0.
POSITIVE = (
    "model.vocab_size", "model.d_model", "model.num_layers", "model.num_heads", "model.num_kv_heads",
    "model.mlp_dim", "model.max_seq_len", "model.relative_buckets", "model.relative_max_distance",
    "model.mla.kv_lora_rank", "model.mla.qk_rope_head_dim", "model.mla.qk_nope_head_dim", "model.mla.v_head_dim",
    "model.moe.experts_per_token", "model.moe.expert_dim", "model.moe.num_groups", "model.moe.top_groups",
    "loss.chunk_size", "data.seq_len", "data.batch_size", "data.shuffle_buffer",
    "optim.microbatches", "finetune.lora.rank", "finetune.prefix.length", "finetune.prefix.hidden",
    "finetune.loreft.rank", "total_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
    "max_consecutive_skips", "rl.max_new_tokens", "rl.epochs", "rl.minibatches",
)
# Integer fields that must be >= 0.
NON_NEGATIVE = ("model.attention_max_segments", "model.mla.q_lora_rank", "model.moe.num_experts",
                "model.moe.shared_experts", "model.moe.first_dense_layers", "optim.warmup_steps", "seed")
# Float fields: each must be a finite number in the range the text names (what the predicate accepts).
RANGES = {
    "model.rope_theta": ("> 0", lambda v: v > 0),
    "model.rope_scaling.factor": (">= 1", lambda v: v >= 1),
    "model.rope_scaling.low_freq_factor": ("> 0", lambda v: v > 0),
    "model.rope_scaling.high_freq_factor": ("> 0", lambda v: v > 0),
    "model.norm_eps": ("> 0", lambda v: v > 0),
    "model.init_std": ("> 0", lambda v: v > 0),
    "model.mla.latent_norm_eps": ("> 0", lambda v: v > 0),
    "model.moe.routed_scaling": ("> 0", lambda v: v > 0),
    "model.moe.capacity_factor": (">= 0 (0: dropless)", lambda v: v >= 0),
    "model.moe.aux_loss_coef": (">= 0", lambda v: v >= 0),
    "model.moe.router_z_loss_coef": (">= 0", lambda v: v >= 0),
    "model.moe.bias_update_rate": (">= 0 (0: no bias balancing)", lambda v: v >= 0),
    "loss.z_loss": (">= 0", lambda v: v >= 0),
    "finetune.lora.alpha": ("> 0", lambda v: v > 0),
    "finetune.dpo.beta": ("> 0", lambda v: v > 0),
    "finetune.dpo.label_smoothing": ("in [0, 0.5)", lambda v: 0 <= v < 0.5),
    "finetune.dpo.sft_weight": (">= 0", lambda v: v >= 0),
    "finetune.lora.dropout": ("in [0, 1)", lambda v: 0 <= v < 1),
    "loss.label_smoothing": ("in [0, 1)", lambda v: 0 <= v < 1),
    "optim.learning_rate": ("> 0", lambda v: v > 0),
    "optim.end_lr_ratio": ("in [0, 1]", lambda v: 0 <= v <= 1),
    "optim.b1": ("in [0, 1)", lambda v: 0 <= v < 1),
    "optim.b2": ("in [0, 1)", lambda v: 0 <= v < 1),
    "optim.eps": ("> 0", lambda v: v > 0),
    "optim.weight_decay": (">= 0", lambda v: v >= 0),
    "optim.grad_clip_norm": (">= 0 (0 disables clipping)", lambda v: v >= 0),
    "rl.temperature": ("> 0", lambda v: v > 0),
    "rl.clip_range": ("> 0", lambda v: v > 0),
    "rl.clip_range_value": ("> 0", lambda v: v > 0),
    "rl.vf_coef": (">= 0", lambda v: v >= 0),
    "rl.gamma": ("in (0, 1]", lambda v: 0 < v <= 1),
    "rl.lam": ("in [0, 1]", lambda v: 0 <= v <= 1),
    "rl.kl_coef": (">= 0", lambda v: v >= 0),
    "rl.kl_target": (">= 0 (0: a fixed coefficient)", lambda v: v >= 0),
    "rl.kl_horizon": ("> 0", lambda v: v > 0),
}


def base_config() -> ml_collections.ConfigDict:
    """Every field lm reads, with defaults for a small pre-norm RoPE/RMSNorm/SwiGLU model."""
    c = ml_collections.ConfigDict()

    c.model = m = ml_collections.ConfigDict()
    m.vocab_size = 2048
    m.d_model = 256
    m.num_layers = 4
    m.num_heads = 4
    m.num_kv_heads = 4  # == num_heads: MHA; 1 < k < num_heads: GQA; 1: MQA.
    m.mlp_dim = 1024  # Hidden width of the MLP (per branch for SwiGLU).
    m.max_seq_len = 256  # Longest sequence the model supports (learned position table size, decoding cache).
    m.position_embedding = "rope"
    m.rope_theta = 10_000.0
    # RoPE frequency scaling for contexts beyond the pre-training length (Hugging Face's `rope_scaling`): none;
    # linear (positions divided by `factor`); llama3 (Llama 3.1's by-wavelength interpolation between
    # `low_freq_factor` and `high_freq_factor`, relative to `original_max_seq_len`).
    m.rope_scaling = r = ml_collections.ConfigDict()
    r.type = "none"
    r.factor = 1.0
    r.low_freq_factor = 1.0
    r.high_freq_factor = 4.0
    r.original_max_seq_len = 8192
    # T5's relative position bias (position_embedding = "relative"): a learned bias per head and bucket of the
    # key's distance behind the query; exact buckets up to half of `relative_buckets`, log-spaced up to
    # `relative_max_distance`, one bucket beyond. One table serves every layer (as T5).
    m.relative_buckets = 32
    m.relative_max_distance = 128
    # rmsnorm | layernorm | scalenorm (Nguyen & Salazar 2019: g * x / ||x|| with one learned scalar g, initialised
    # to sqrt(d_model)).
    m.norm = "rmsnorm"
    m.norm_eps = 1e-5
    m.norm_position = "pre"
    m.mlp_activation = "swiglu"
    m.head_dim = config_dict.placeholder(int)  # Width of each head; None: d_model // num_heads.
    # mha: multi-head attention, grouped by num_kv_heads (MHA, GQA, MQA). mla: DeepSeek-V2's multi-head latent
    # attention, whose KV cache holds one compressed latent and one shared rotary key per token (`mla` below).
    m.attention_type = "mha"
    m.mla = mla = ml_collections.ConfigDict()
    mla.q_lora_rank = 0  # Width of the query's latent (DeepSeek's q_lora_rank); 0: a full-rank query projection.
    mla.kv_lora_rank = 64  # Width of the compressed key/value latent the cache keeps.
    mla.qk_rope_head_dim = 16  # The rotary part of each query/key head; the key's is shared by all heads.
    mla.qk_nope_head_dim = 32  # The part of each query/key head without positions, expanded from the latent.
    mla.v_head_dim = 32  # Width of each value head, expanded from the latent.
    # Decoding: True multiplies the key/value up-projections into the query and the output (attention over the
    # latent itself, no per-head keys or values); False expands them per head, the reference the tests compare to.
    mla.absorb = True
    mla.latent_norm_eps = 1e-6  # The RMSNorms of the latents (DeepSeek's fixed 1e-6).
    # Mixture of experts in place of the dense MLP (lm.moe); num_experts = 0 keeps every MLP dense.
    m.moe = moe = ml_collections.ConfigDict()
    moe.num_experts = 0  # Routed experts.
    moe.experts_per_token = 2  # Routed experts each token goes to (top-k).
    moe.shared_experts = 0  # Experts every token goes to (DeepSeek), each of width expert_dim.
    moe.expert_dim = 256  # Hidden width of each expert.
    moe.first_dense_layers = 0  # The first layers keep a dense MLP of width mlp_dim (DeepSeek's first_k_dense_replace).
    moe.router = "softmax"  # softmax (Mixtral, Switch) | sigmoid (DeepSeek-V3) scores over the experts.
    moe.normalize_top_k = True  # Rescale the chosen experts' weights to sum to 1.
    moe.routed_scaling = 1.0  # Factor on the routed experts' output (DeepSeek-V3's routed_scaling_factor).
    # Group-limited routing (DeepSeek-V3): experts in num_groups groups, tokens choose among the top_groups best.
    moe.num_groups = 1
    moe.top_groups = 1
    moe.capacity_factor = 0.0  # 0: dropless; c > 0: each expert takes at most c * tokens * k / experts tokens.
    moe.aux_loss_coef = 0.01  # Switch/GShard load-balancing loss, added to the training loss.
    moe.router_z_loss_coef = 0.0  # ST-MoE router z-loss.
    # DeepSeek-V3's auxiliary-loss-free balancing: a per-expert bias on the routing scores (selection only), moved
    # by this much against each expert's load error after every step; 0 disables.
    moe.bias_update_rate = 0.0
    # Biases, per group of projections: query/key/value (Qwen2, GPT-2), the attention output (GPT-2), and the MLP
    # (GPT-2). Llama's `attention_bias` is qkv_bias and attention_out_bias, its `mlp_bias` is mlp_bias.
    m.qkv_bias = False
    m.attention_out_bias = False
    m.mlp_bias = False
    m.tie_embeddings = False  # Output head reuses the token embedding (transposed).
    m.dtype = "bfloat16"  # Compute dtype of activations and matmuls.
    m.param_dtype = "float32"  # Storage dtype of parameters (master weights).
    m.attention = "auto"  # auto: cuDNN flash attention on GPU, XLA reference elsewhere.
    # cuDNN only: above 0, packed documents reach cuDNN as the lengths and offsets of at most this many runs per row
    # (documents, plus one for trailing padding) instead of a [b, 1, t, t] mask; every batch is checked against it.
    m.attention_max_segments = 0
    m.scan_layers = True  # Stack layers with nn.scan: compile time does not grow with depth.
    # none | full (recompute everything) | dots | dots_no_batch (jax.checkpoint_policies). With scan_layers, `dots`
    # (keep matmul outputs, recompute elementwise ops) moves less memory than `none`, which stacks every
    # intermediate of every layer (the CPU benchmark, lm.bench.peer: 713 against 926 ms per step).
    m.remat_policy = "full"
    m.init = "truncated_normal"
    m.init_std = 0.02  # Std of the truncated-normal init; output projections are scaled by 1/sqrt(2 * num_layers).
    # None: no soft-cap; c: logits are c * tanh(logits / c) wherever they are formed (loss, evaluation, sampling).
    m.logit_softcap = config_dict.placeholder(float)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1  # -1: all remaining devices.
    c.mesh.expert = 1  # Expert parallelism: experts split over it, everything else data parallel over it.
    c.mesh.tensor = 1
    # Sizes of each axis across hosts (GPU nodes, TPU slices) over the data-center network; the sizes above are
    # within one host. The total axis size is the product. Data parallelism is what should cross hosts.
    c.mesh.dcn_data = 1
    c.mesh.dcn_fsdp = 1
    c.mesh.dcn_expert = 1
    c.mesh.dcn_tensor = 1

    c.sharding = ml_collections.ConfigDict()
    c.sharding.zero_stage = 1
    # Logical axis -> mesh axes, for parameters and activations. Where parameters, gradients and optimizer state
    # sit along the data axes (`data`, `fsdp`) is decided by zero_stage (lm/sharding.py), not by these rules.
    c.sharding.logical_axis_rules = (
        # Experts first: in the expert-major activations of a mixture-of-experts layer (`[experts, batch, ...]`)
        # the experts take the `expert` mesh axis and the batch falls back to the other data axes (Flax gives a
        # mesh axis to the first rule that claims it); everywhere else the batch is split over all three.
        ("expert", "expert"),
        ("batch", ("data", "fsdp", "expert")),
        ("batch", ("data", "fsdp")),
        ("length", None),
        ("embed", None),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("head_dim", None),
        ("mlp", "tensor"),
        ("vocab", "tensor"),
        ("layers", None),
    )

    c.loss = ml_collections.ConfigDict()
    c.loss.chunk_size = 4096  # Vocabulary columns per step of the blockwise cross-entropy scan.
    c.loss.z_loss = 0.0  # PaLM z-loss coefficient: z_loss * logsumexp^2.
    c.loss.label_smoothing = 0.0

    c.data = d = ml_collections.ConfigDict()
    d.source = "default"  # default (built-in corpus) | tfds | files | synthetic
    d.name = ""  # TFDS dataset name for source=tfds, e.g. "lm1b" or "c4/en".
    d.data_dir = config_dict.placeholder(str)  # TFDS data_dir (local path or gs://).
    d.files = config_dict.placeholder(str)  # Glob of .txt / .jsonl files for source=files.
    d.text_field = "text"
    d.train_split = "train"
    d.eval_split = "validation"
    d.seq_len = 128
    d.batch_size = 16  # Global batch (sequences) across all processes.
    d.pack = True  # Pack documents into full windows; False: one document per row, padded.
    d.shuffle_buffer = 1024  # Documents shuffled within a window, for TFRecord datasets read in order.
    # What a record is: text (documents for pretraining); prompt_completion (JSON lines {"prompt", "completion"}) or
    # chat (JSON lines {"messages": [{"role", "content"}, ...]}) for supervised fine-tuning, where the loss counts
    # only completion / assistant tokens (lm/data/sft.py). Fine-tuning records come from config.data.files.
    d.format = "text"
    # chat: "" uses the tokenizer's own template (tokenizer_config.json) or, without one, lm's built-in plain
    # template; "plain" forces the built-in one; anything else is a Jinja template string.
    d.chat_template = ""
    d.overlong = "truncate"  # A fine-tuning example longer than seq_len + 1 tokens: truncate | drop (both counted).
    d.cache_dir = config_dict.placeholder(str)  # Prepared local datasets and tokenizers; None: $LM_CACHE_DIR or ~/.cache/lm.
    d.tokenizer = t = ml_collections.ConfigDict()
    # A SentencePiece .model, a Hugging Face tokenizer.json, or a directory with either; None: train a SentencePiece
    # model on the source and cache it.
    t.path = config_dict.placeholder(str)
    t.vocab_size = 2048
    t.model_type = "bpe"  # SentencePiece model type when training one: bpe | unigram.
    t.byte_fallback = True
    t.pad_id = 0
    t.bos_id = 1
    t.eos_id = 2
    t.unk_id = 3

    c.optim = o = ml_collections.ConfigDict()
    o.optimizer = "adamw"
    o.learning_rate = 3e-4  # Peak learning rate.
    o.warmup_steps = 100
    o.schedule = "cosine"  # Decay after warmup.
    o.end_lr_ratio = 0.1  # Floor of the decay as a fraction of the peak.
    o.b1 = 0.9
    o.b2 = 0.95
    o.eps = 1e-8
    o.weight_decay = 0.1
    o.decay_embeddings = False  # Weight decay on embeddings (never on norms or biases).
    o.grad_clip_norm = 1.0  # Global-norm clipping; 0 disables.
    o.microbatches = 1  # Gradient accumulation: the global batch is split into this many sequential micro-batches.

    # Fine-tuning (lm/peft.py): full (every parameter trains) or a parameter-efficient method whose adapters are
    # their own parameter tree over a frozen base read from config.init_from.
    c.finetune = f = ml_collections.ConfigDict()
    f.method = "full"  # full | lora | prefix | loreft
    # lm: next-token loss on the data's trained tokens (every token of text documents); sft: the same loss, on
    # fine-tuning records only (config.data.format prompt_completion or chat: completion / assistant tokens);
    # dpo: direct preference optimisation on preference pairs (config.data.format preference; lm/dpo.py);
    # reward: a reward model (a scalar head, Bradley-Terry loss) on preference pairs (lm/reward.py);
    # ppo: reinforcement learning from a reward, run by python -m lm.rl (config.rl; lm/rl.py).
    f.objective = "lm"
    f.dpo = ml_collections.ConfigDict()
    f.dpo.beta = 0.1  # Strength of the KL constraint to the reference (the model config.init_from names).
    f.dpo.loss = "sigmoid"  # sigmoid (DPO) | ipo (length-normalised log-ratios, as TRL).
    # Conservative DPO: the probability that a preference label is wrong (sigmoid; TRL 1.x's sigmoid ignores it).
    f.dpo.label_smoothing = 0.0
    # Weight of the chosen completions' token NLL added to the loss (TRL's loss_type ["sigmoid", "sft"] with
    # loss_weights [1, w]; RPO, Pang et al. 2024): keeps the chosen likelihood from falling with the rejected one.
    f.dpo.sft_weight = 0.0
    # model: run the reference (config.init_from) forward on every batch; precomputed: read its log-probabilities
    # from the records (ref_chosen_logps, ref_rejected_logps, TRL's columns; python -m lm.reference_log_probs
    # writes them), so full DPO holds no reference copy and runs no reference forward.
    f.dpo.reference = "model"
    f.reward = ml_collections.ConfigDict()
    f.reward.center_coef = 0.0  # TRL's center_rewards_coefficient: + coef * mean((r_c + r_r)^2) keeps scores near 0.
    f.lora = ml_collections.ConfigDict()
    f.lora.rank = 8
    f.lora.alpha = 16.0  # The update is scaled by alpha / rank.
    f.lora.dropout = 0.0  # Dropout on the adapter's input, in training only.
    f.lora.targets = LORA_TARGETS  # Projections that get an adapter (all of them).
    # a_gaussian_b_zero (standard: the update starts at 0 and both factors learn), a_zero_b_gaussian (starts at 0,
    # but B gets no gradient at step 0), both_gaussian (the model changes at step 0).
    f.lora.init = "a_gaussian_b_zero"
    f.prefix = ml_collections.ConfigDict()
    f.prefix.length = 16  # Learned key/value vectors per layer.
    f.prefix.reparameterize = False  # Prefixes made by a per-layer MLP from learned embeddings (Li & Liang 2021).
    f.prefix.hidden = 512  # Hidden width of that MLP.
    f.loreft = ml_collections.ConfigDict()
    f.loreft.rank = 4  # Dimension of the edited subspace.
    f.loreft.layers = ()  # Layer indices whose output is edited; () means every layer.
    # Positions edited: "all", or pyreft's "f<N>", "l<N>", "f<N>+l<N>": the first / last N tokens of each prompt.
    f.loreft.positions = "all"

    # PPO (config.finetune.objective = "ppo", run by python -m lm.rl; lm/rl.py, lm/ppo.py). A step is one rollout
    # batch: config.data.batch_size prompts, each completed once, then `epochs` passes over it in `minibatches`.
    # The loss, GAE and KL defaults are TRL's PPOConfig's; sampling (temperature 1, 16 new tokens) is lm's choice.
    c.rl = r = ml_collections.ConfigDict()
    r.prompts = ""  # JSON lines {"prompt": str or chat messages}: what rollouts complete.
    r.reward_fn = ""  # module:function(prompts: list[str], completions: list[str]) -> list[float] (verifiable tasks),
    r.reward_model = ""  # or an lm workdir of a reward model (finetune.objective reward): exactly one of the two.
    r.max_new_tokens = 16
    r.temperature = 1.0  # Sampling temperature; the log-probabilities PPO compares are at this temperature.
    r.epochs = 4  # Passes over each rollout batch.
    r.minibatches = 1  # Optimizer steps per pass.
    r.clip_range = 0.2  # Policy ratio clip, eps.
    r.clip_range_value = 0.2  # Value prediction clip around the rollout's values.
    r.vf_coef = 0.1  # Weight of the value loss.
    r.gamma = 1.0  # Discount.
    r.lam = 0.95  # GAE lambda.
    r.kl_coef = 0.05  # Per-token KL penalty to the reference (the initial value when adaptive).
    r.kl_estimator = "k1"  # k1 (log p - log p_ref) | k3 (r - 1 - log r), TRL's.
    r.kl_target = 0.0  # > 0: adapt kl_coef toward this KL per response (Ziegler et al. 2019); 0: fixed kl_coef.
    r.kl_horizon = 10000  # The adaptive controller's time scale, in responses.

    # Where a new run's weights come from: "" (random init), an lm workdir DIR or DIR:STEP, or a Hugging Face model
    # directory or hub id; the model fields then come from it too (lm/init_from.py).
    c.init_from = ""
    c.total_steps = 1000
    c.seed = 0
    c.log_every = 10
    c.eval_every = 200
    c.eval_steps = 10  # Batches per evaluation; -1: the whole eval split, exactly once.
    c.checkpoint_every = 200
    c.keep_checkpoints = 3
    c.max_consecutive_skips = 10  # Non-finite steps in a row before the run stops.
    return c


def load(path: str, **overrides) -> ml_collections.ConfigDict:
    """Loads a config file the way `--config=path[:arg]` does, then applies dotted overrides.

    `load("configs/tiny.py", **{"model.num_layers": 2})` equals `--config=configs/tiny.py --config.model.num_layers=2`.
    """
    path, _, arg = path.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        section = config
        for key in parents:
            section = section[key]
        if leaf not in section:
            raise ConfigError(f"config.{dotted} is not a config field")
        section[leaf] = value
    return config


def _get(config: ml_collections.ConfigDict, dotted: str):
    value = config
    for key in dotted.split("."):
        value = value[key]
    return value


def head_dim(model_config: ml_collections.ConfigDict) -> int:
    """Per-head width: `model.head_dim`, or d_model / num_heads when that is None."""
    if model_config.head_dim is not None:
        return model_config.head_dim
    return model_config.d_model // model_config.num_heads


def loreft_positions(spec: str) -> tuple[int, int] | None:
    """`(first, last)` counts of a `config.finetune.loreft.positions` spec (`lm.peft`): None for `all`, `(3, 0)`
    for `f3`, `(0, 2)` for `l2`, `(3, 2)` for `f3+l2`. Raises ValueError on anything else."""
    if spec == "all":
        return None
    counts = {}
    for part in spec.split("+"):
        match = re.fullmatch(r"([fl])([1-9][0-9]*)", part)
        if match is None or match[1] in counts:
            raise ValueError(f"{spec!r}: expected 'all', 'f<N>', 'l<N>' or 'f<N>+l<N>' (N >= 1)")
        counts[match[1]] = int(match[2])
    return counts.get("f", 0), counts.get("l", 0)


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks a whole config; raises ConfigError naming the first bad field. Returns the config for chaining."""
    is_int = lambda value: isinstance(value, int) and not isinstance(value, bool)
    for field in POSITIVE:
        value = _get(config, field)
        if not is_int(value) or value <= 0:
            raise ConfigError(f"config.{field} must be a positive integer, got {value!r}")
    for field in NON_NEGATIVE:
        value = _get(config, field)
        if not is_int(value) or value < 0:
            raise ConfigError(f"config.{field} must be an integer >= 0, got {value!r}")
    for field, (expected, accepts) in RANGES.items():
        value = _get(config, field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not accepts(value):
            raise ConfigError(f"config.{field} must be a finite number {expected}, got {value!r}")
    for field, allowed in CHOICES.items():
        value = _get(config, field)
        if value not in allowed:
            raise ConfigError(f"config.{field}={value!r} is not one of {', '.join(allowed)}")

    m = config.model
    if m.head_dim is None and m.d_model % m.num_heads:
        raise ConfigError(
            f"config.model.d_model={m.d_model} must be divisible by config.model.num_heads={m.num_heads} (or set "
            f"config.model.head_dim)")
    if m.head_dim is not None and (not is_int(m.head_dim) or m.head_dim <= 0):
        raise ConfigError(f"config.model.head_dim must be None or a positive integer, got {m.head_dim!r}")
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(
            f"config.model.num_heads={m.num_heads} must be divisible by config.model.num_kv_heads={m.num_kv_heads}")
    if m.position_embedding == "rope" and m.attention_type != "mla":  # MLA rotates its own width (checked below).
        if head_dim(m) % 2:
            raise ConfigError(
                f"config.model.position_embedding='rope' needs an even head dimension, but the head dimension is "
                f"{head_dim(m)}")
    _validate_variants(m)
    scaling = m.rope_scaling
    if scaling.type == "llama3" and not scaling.high_freq_factor > scaling.low_freq_factor:
        raise ConfigError(
            f"config.model.rope_scaling.high_freq_factor={scaling.high_freq_factor} must be above "
            f"low_freq_factor={scaling.low_freq_factor}")
    if scaling.type != "none" and (not is_int(scaling.original_max_seq_len) or scaling.original_max_seq_len <= 0):
        raise ConfigError(f"config.model.rope_scaling.original_max_seq_len must be a positive integer, got "
                          f"{scaling.original_max_seq_len!r}")
    if m.logit_softcap is not None and not m.logit_softcap > 0:
        raise ConfigError(f"config.model.logit_softcap must be None or positive, got {m.logit_softcap!r}")
    if m.attention == "splash" and config.data.seq_len % attention_lib.SPLASH_LANES:
        raise ConfigError(f"config.model.attention='splash' works on lengths that are multiples of "
                          f"{attention_lib.SPLASH_LANES}: config.data.seq_len={config.data.seq_len} is not")
    if config.data.seq_len > m.max_seq_len:
        raise ConfigError(
            f"config.model.max_seq_len={m.max_seq_len} is below the training length "
            f"config.data.seq_len={config.data.seq_len}")
    if config.sharding.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"config.sharding.zero_stage={config.sharding.zero_stage!r} is not one of 0, 1, 2, 3")
    eval_steps = config.eval_steps
    if not isinstance(eval_steps, int) or isinstance(eval_steps, bool) or not (eval_steps == -1 or eval_steps > 0):
        raise ConfigError(f"config.eval_steps must be a positive integer or -1 (the whole split), got {eval_steps!r}")
    _validate_finetune(config)
    return config


# Attention implementations that cannot add a learned [heads, t, s] bias (T5's relative positions) to their scores.
NO_BIAS_ATTENTION = ("blockwise", "splash")


def _validate_variants(m: ml_collections.ConfigDict) -> None:
    """The model variants' own constraints: MLA, mixture of experts, and what each attention implementation takes."""
    if m.attention_type == "mla":
        if m.position_embedding != "rope":
            raise ConfigError(f"config.model.attention_type='mla' carries positions in its decoupled rotary part: "
                              f"set config.model.position_embedding='rope', not {m.position_embedding!r}")
        if m.mla.qk_rope_head_dim % 2:
            raise ConfigError(f"config.model.mla.qk_rope_head_dim={m.mla.qk_rope_head_dim} must be even (RoPE pairs)")
        if m.attention not in ("xla", "auto") and m.mla.v_head_dim > m.mla.qk_nope_head_dim + m.mla.qk_rope_head_dim:
            raise ConfigError(f"config.model.attention={m.attention!r} takes one head width: MLA's v_head_dim="
                              f"{m.mla.v_head_dim} must be at most qk_nope_head_dim + qk_rope_head_dim, or use 'xla'")
    if m.position_embedding == "relative" and m.attention in NO_BIAS_ATTENTION:
        raise ConfigError(f"config.model.position_embedding='relative' adds a learned bias to the scores, which "
                          f"config.model.attention={m.attention!r} cannot take; use 'xla', 'cudnn' or 'auto'")
    if m.position_embedding == "alibi" and m.attention == "splash":
        raise ConfigError("config.model.position_embedding='alibi' adds a bias to the scores, which "
                          "config.model.attention='splash' cannot take; use 'blockwise', 'xla', 'cudnn' or 'auto'")
    moe = m.moe
    if moe.num_experts:
        if moe.experts_per_token > moe.num_experts:
            raise ConfigError(f"config.model.moe.experts_per_token={moe.experts_per_token} must be at most "
                              f"config.model.moe.num_experts={moe.num_experts}")
        if moe.num_experts % moe.num_groups or moe.top_groups > moe.num_groups:
            raise ConfigError(f"config.model.moe.num_groups={moe.num_groups} must divide num_experts="
                              f"{moe.num_experts} and be at least top_groups={moe.top_groups}")
        if moe.experts_per_token > moe.top_groups * (moe.num_experts // moe.num_groups):
            raise ConfigError(f"config.model.moe.experts_per_token={moe.experts_per_token} is more than the "
                              f"{moe.top_groups} top groups of {moe.num_experts // moe.num_groups} experts hold")
        if moe.first_dense_layers >= m.num_layers:
            raise ConfigError(f"config.model.moe.first_dense_layers={moe.first_dense_layers} leaves no mixture-of-"
                              f"experts layer among config.model.num_layers={m.num_layers}")


def _validate_rl(config: ml_collections.ConfigDict) -> None:
    r = config.rl
    if not r.prompts:
        raise ConfigError("config.finetune.objective='ppo' completes prompts: set config.rl.prompts to a JSON lines "
                          "file of {\"prompt\": ...} records")
    if bool(r.reward_fn) == bool(r.reward_model):
        raise ConfigError(f"config.rl.reward_fn={r.reward_fn!r} and config.rl.reward_model={r.reward_model!r}: set "
                          f"exactly one (a module:function, or a reward model's lm workdir)")
    if r.reward_fn and r.reward_fn.count(":") != 1:
        raise ConfigError(f"config.rl.reward_fn={r.reward_fn!r} must be module:function")
    if r.temperature != 1.0 and config.model.logit_softcap is not None:
        raise ConfigError(f"config.rl.temperature={r.temperature} with config.model.logit_softcap: the tempered "
                          f"log-probabilities of a soft-capped model are not computed; use temperature 1")
    if config.data.batch_size % r.minibatches:
        raise ConfigError(f"config.data.batch_size={config.data.batch_size} must split into config.rl.minibatches="
                          f"{r.minibatches} minibatches")
    if r.max_new_tokens >= config.data.seq_len:
        raise ConfigError(f"config.rl.max_new_tokens={r.max_new_tokens} leaves no room for a prompt in rows of "
                          f"config.data.seq_len={config.data.seq_len} tokens")
    if r.kl_target > 0 and r.kl_coef == 0:
        raise ConfigError("config.rl.kl_target adapts config.rl.kl_coef multiplicatively: start it above 0")
    if config.finetune.method == "lora" and config.finetune.lora.dropout > 0:
        raise ConfigError("config.finetune.lora.dropout must be 0 for PPO: the rollout's log-probabilities are taken "
                          "without dropout, so the first update's policy ratio would not be 1")


# Objectives trained on preference pairs (`config.data.format = "preference"`).
PREFERENCE_OBJECTIVES = ("dpo", "reward")


def _validate_finetune(config: ml_collections.ConfigDict) -> None:
    f = config.finetune
    unknown = [t for t in f.lora.targets if t not in LORA_TARGETS]
    if not f.lora.targets or unknown or isinstance(f.lora.targets, str):
        raise ConfigError(f"config.finetune.lora.targets={tuple(f.lora.targets)!r} must be a non-empty tuple of "
                          f"{', '.join(LORA_TARGETS)}")
    if f.method == "lora" and config.model.attention_type == "mla" and {"key", "value"} & set(f.lora.targets):
        raise ConfigError(f"config.finetune.lora.targets={tuple(f.lora.targets)!r}: an MLA model has no key or value "
                          f"projection (they are expanded from a latent); target query and out")
    if f.method == "lora" and config.model.moe.num_experts and {"gate", "up", "down"} & set(f.lora.targets):
        raise ConfigError(f"config.finetune.lora.targets={tuple(f.lora.targets)!r}: LoRA on the experts of a "
                          f"mixture-of-experts MLP is not offered; target the attention projections")
    if f.method == "prefix" and config.model.attention_type == "mla":
        raise ConfigError("config.finetune.method='prefix' needs per-head keys and values, which an MLA model "
                          "(config.model.attention_type='mla') does not form; use lora or loreft")
    if config.model.mlp_activation != "swiglu" and "gate" in f.lora.targets and f.method == "lora":
        raise ConfigError("config.finetune.lora.targets has 'gate', but a GELU MLP (config.model.mlp_activation="
                          "'gelu') has no gate projection")
    layers = tuple(f.loreft.layers)
    if any(not isinstance(i, int) or not 0 <= i < config.model.num_layers for i in layers):
        raise ConfigError(f"config.finetune.loreft.layers={layers!r} must hold layer indices in [0, "
                          f"{config.model.num_layers})")
    try:
        loreft_positions(f.loreft.positions)
    except ValueError as error:
        raise ConfigError(f"config.finetune.loreft.positions={error}") from None
    if f.loreft.rank > config.model.d_model:
        raise ConfigError(f"config.finetune.loreft.rank={f.loreft.rank} must be at most config.model.d_model="
                          f"{config.model.d_model}")
    if f.method != "full" and not config.init_from:
        raise ConfigError(f"config.finetune.method={f.method!r} adapts a base model: set config.init_from to its lm "
                          f"workdir (DIR or DIR:STEP; import a Hugging Face model first with python -m lm.hf import)")
    if config.data.format != "text" and not (config.data.tokenizer.path or config.init_from):
        raise ConfigError(f"config.data.format={config.data.format!r} needs the base model's tokenizer: set "
                          f"config.init_from (or config.data.tokenizer.path)")
    if f.objective == "sft" and config.data.format == "text":
        raise ConfigError("config.finetune.objective='sft' trains on completions: set config.data.format to "
                          "prompt_completion or chat")
    if (config.data.format == "preference") != (f.objective in PREFERENCE_OBJECTIVES):
        raise ConfigError(f"config.finetune.objective={f.objective!r} and config.data.format={config.data.format!r}: "
                          f"preference pairs are what the dpo and reward objectives train on, and all they train on")
    if f.objective in ("dpo", "ppo") and not config.init_from:
        raise ConfigError(f"config.finetune.objective={f.objective!r} compares the policy with a reference model: set "
                          f"config.init_from to it (the run starts from it too)")
    if f.objective == "ppo":
        _validate_rl(config)
    if config.data.format == "preference" and config.data.batch_size % 2:
        raise ConfigError(f"config.data.batch_size={config.data.batch_size} must be even with preference data "
                          f"(a pair's chosen and rejected rows)")
    if config.data.format != "text" and config.data.source != "files":
        raise ConfigError(f"config.data.format={config.data.format!r} reads JSON lines: set config.data.source='files' "
                          f"and config.data.files")


# ---------------------------------------------------------------------------------------------------------------
# The copy of the config a workdir keeps.


def to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as plain JSON values (what `config.json` and each checkpoint hold)."""
    return json.loads(config.to_json_best_effort())


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Writes `workdir/config.json` atomically (a crash never leaves a half-written file)."""
    paths.write_atomic(paths.resolve(workdir, CONFIG_FILE), json.dumps(to_dict(config), indent=2, sort_keys=True))


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run in `workdir` was started with: `base_config()` updated with `workdir/config.json`."""
    path = paths.resolve(workdir, CONFIG_FILE)
    if paths.resolve(workdir).is_file():
        raise CheckpointError(f"workdir {workdir!r} is a file, not a directory")
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: {workdir!r} is not an lm workdir")
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}); restore it from a checkpoint's `config` item "
                              f"(checkpoints/<step>/config/metadata)") from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path} holds a {type(saved).__name__}, not an lm config")
    config = base_config()
    _update(config, saved)
    return config


def _update(config: ml_collections.ConfigDict, values: dict[str, Any]) -> None:
    """Sets `values` (nested JSON) into `config`; lists become tuples (at every depth) where the field holds one."""
    as_tuples = lambda v: tuple(as_tuples(x) for x in v) if isinstance(v, list) else v
    for key, value in values.items():
        if isinstance(value, dict) and key in config and isinstance(config[key], ml_collections.ConfigDict):
            _update(config[key], value)
        elif key in config:
            config[key] = as_tuples(value) if isinstance(config[key], tuple) else value
        else:
            with config.unlocked():
                config[key] = value


def check_same_model(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Raises if `workdir` holds a run whose model differs from `config.model` (its checkpoints would not fit)."""
    if not paths.resolve(workdir, CONFIG_FILE).exists():
        return
    saved_config = read_config(workdir)
    saved = saved_config.model.to_dict()
    current = config.model.to_dict()
    differences = [f"{k}: {saved.get(k)!r} in the workdir, {current.get(k)!r} now"
                   for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if differences:
        raise CheckpointError(
            f"{workdir} holds a run of another model (config.model {'; '.join(differences)}); use a new --workdir "
            f"or the original config")
    adapters = lambda c: (c.finetune.method, c.finetune.get(c.finetune.method, ml_collections.ConfigDict()).to_dict())
    if adapters(saved_config) != adapters(config):
        raise CheckpointError(f"{workdir} holds a run with other adapters (config.finetune {adapters(saved_config)} "
                              f"there, {adapters(config)} now); use a new --workdir or the original config")
    if config.finetune.method != "full" and saved_config.init_from != config.init_from:
        raise CheckpointError(f"{workdir} holds adapters of the base {saved_config.init_from}, but config.init_from is "
                              f"{config.init_from} now; resume with --config.init_from={saved_config.init_from}")
