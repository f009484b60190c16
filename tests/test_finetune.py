"""Fine-tuning: the adapters of `lm.peft` (step 0, LoRA's initialisations, merging, PEFT export, sharding, memory,
resume) and supervised fine-tuning data (`lm.data.sft`: masks per template, packing, bad records, overlong
examples). LoRA learning an instruction task the base model cannot do is checked where it is shown:
`notebooks/03_finetune.ipynb`, executed and its printed accuracies asserted by `tests/test_notebooks.py`."""

import functools
import itertools
import json
import os
import random
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import RECORDS_CORPUS
from lm import checkpoint
from lm import config as lm_config
from lm import evaluate as evaluate_lib
from lm import flops
from lm import generate
from lm import kv_cache
from lm import model as model_lib
from lm import objective
from lm import peft
from lm import preflight
from lm import train as train_lib
from lm import train_step as train_step_lib
from lm.bench import finetune as finetune_bench
from lm.data import chat, pipeline, sft
from lm.data import tokenizer as tokenizer_lib
from lm.errors import CheckpointError, ConfigError, EmptyDatasetError, RecordError
from lm.hf import convert

METHODS = ("lora", "prefix", "loreft")


def tiny_config(method: str = "full", **overrides):
    """A 2-layer Llama-shaped model on synthetic batches: fp32, so equalities are exact where they should be."""
    c = lm_config.base_config()
    c.model.update(vocab_size=128, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64, max_seq_len=64,
                   dtype="float32", remat_policy="none")
    c.data.update(source="synthetic", seq_len=16, batch_size=8)
    c.loss.chunk_size = 64
    c.optim.update(warmup_steps=0, learning_rate=1e-2)
    c.update(total_steps=4, log_every=1, eval_every=100, eval_steps=1, checkpoint_every=2)
    c.finetune.method = method
    if method != "full":
        c.init_from = "base"
    c.update_from_flattened_dict(overrides)
    return lm_config.validate(c)


def logits(config, params, tokens_bt):
    """fp32 `[b, t, v]` logits of `config`'s model."""
    return _logits(model_lib.build(config), params, tokens_bt)


@functools.partial(jax.jit, static_argnums=0)
def _logits(model, params, tokens_bt):
    return model.apply({"params": params}, model.apply({"params": params}, tokens_bt),
                       method=model_lib.Transformer.logits)


TOKENS = jax.random.randint(jax.random.key(1), (2, 16), 0, 128)


@functools.cache
def _initialised(method: str, lora_init: str = "a_gaussian_b_zero", scan_layers: bool = True):
    """`(config, params)`: a model with `method`'s adapters as initialised (shared by the tests: inits compile).
    `prefix_mlp`: prefix tuning with its reparameterisation MLP."""
    overrides = {"finetune.lora.init": lora_init, "model.scan_layers": scan_layers}
    if method == "prefix_mlp":
        method = "prefix"
        overrides.update({"finetune.prefix.reparameterize": True, "finetune.prefix.hidden": 16})
    config = tiny_config(method, **overrides)
    init = jax.jit(lambda key: nn.unbox(model_lib.init(model_lib.build(config), key)))
    return config, init(jax.random.key(0))


@pytest.mark.parametrize("method", [*METHODS, "prefix_mlp"])
def test_every_method_starts_as_the_base_model(method):
    config, params = _initialised(method)
    base, adapters = peft.split(params)
    assert 0 < peft.count(adapters) < peft.count(base)
    np.testing.assert_array_equal(logits(config, params, TOKENS), logits(peft.base_config(config), base, TOKENS))


def test_prompt_lengths_and_loreft_positions_in_a_packed_row():
    segment_ids_bt = jnp.array([[1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0]])
    weights_bt = jnp.array([[0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 0]])  # Padding (segment 0) trains nothing.
    positions_bt = jnp.array([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1]])
    lengths_bt = peft.prompt_lengths(segment_ids_bt, weights_bt, segment_ids_bt.shape)
    # Input 2 predicts the first trained target of the first example: its prompt is inputs 0-2; the second's 5-6.
    np.testing.assert_array_equal(lengths_bt, [[3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2]])
    np.testing.assert_array_equal(peft.prompt_lengths(segment_ids_bt, None, (1, 11)), [[5] * 5 + [4] * 4 + [2] * 2])
    np.testing.assert_array_equal(peft.prompt_lengths(None, None, (1, 11)), [[11] * 11])
    edited = lambda spec: np.asarray(peft.edit_mask(lm_config.loreft_positions(spec), positions_bt, lengths_bt))
    np.testing.assert_array_equal(edited("f1"), [[1, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0]])
    np.testing.assert_array_equal(edited("l2"), [[0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1]])
    np.testing.assert_array_equal(edited("f1+l1"), [[1, 0, 1, 0, 0, 1, 1, 0, 0, 1, 1]])
    assert lm_config.loreft_positions("all") is None
    for bad in ("f0", "l", "f2+f3", "first3", "f3+"):
        with pytest.raises(ConfigError, match=f"config.finetune.loreft.positions='{re.escape(bad)}': expected"):
            tiny_config("loreft", **{"finetune.loreft.positions": bad})


def test_loreft_positions_edit_the_same_prompt_tokens_in_packed_training_scoring_and_decoding():
    """A LoReFT model editing the first and last two tokens of each prompt, its interventions made nonzero: the
    completion's log-probabilities agree between a packed training batch (prompts found from the weights), scoring
    one example per row with its prompt length (the harness), and decoding with a KV cache (`lm.generate`)."""
    config = tiny_config("loreft", **{"finetune.loreft.positions": "f1+l2"})
    model = model_lib.build(config)
    params = nn.unbox(jax.jit(lambda key: model_lib.init(model, key))(jax.random.key(0)))
    reft = params["layers"]["reft"]
    reft["weight"] = reft["weight"] + jax.random.normal(jax.random.key(1), reft["weight"].shape)
    keys = jax.random.split(jax.random.key(2), 4)
    examples = [(jax.random.randint(keys[0], (6,), 1, 128), jax.random.randint(keys[1], (3,), 1, 128)),
                (jax.random.randint(keys[2], (4,), 1, 128), jax.random.randint(keys[3], (4,), 1, 128))]

    # Each path jitted, as lm runs it: one compile per shape instead of a few hundred of single operations.
    def scored(params, config):  # Completion log-probs, one example per row.
        model = model_lib.build(config)
        score = jax.jit(lambda params, tokens_1t, prompt_length_1: objective.target_log_probs(
            params, tokens_1t[:, :-1], tokens_1t[:, 1:], model, config, prompt_length_b=prompt_length_1)[0])
        log_probs = []
        for prompt, completion in examples:
            log_prob_1t = score(params, jnp.concatenate([prompt, completion])[None], jnp.array([len(prompt)]))
            log_probs.append(log_prob_1t[0, len(prompt) - 1:])
        return jnp.concatenate(log_probs)

    log_probs = scored(params, config)
    # Packed: both examples in one row, the loss weights on their completions.
    inputs, targets, weights, segment_ids, positions = [], [], [], [], []
    for segment, (prompt, completion) in enumerate(examples, 1):
        tokens = jnp.concatenate([prompt, completion])
        inputs.append(tokens[:-1])
        targets.append(tokens[1:])
        weights.append(jnp.arange(len(tokens) - 1) >= len(prompt) - 1)
        segment_ids.append(jnp.full((len(tokens) - 1,), segment))
        positions.append(jnp.arange(len(tokens) - 1))
    batch = {name: jnp.concatenate(parts)[None] for name, parts in (
        ("inputs", inputs), ("targets", targets), ("weights", weights), ("segment_ids", segment_ids),
        ("positions", positions))}
    batch["weights"] = batch["weights"].astype(jnp.float32)
    _, aux = jax.jit(lambda params, batch: objective.lm_loss(params, batch, model, config))(params, batch)
    np.testing.assert_allclose(float(aux["nll"]), -float(log_probs.mean()), rtol=1e-5)
    # Decoding: the prompt in one prefill, then the completion token by token, past the prompt's end.
    decode = jax.jit(lambda params, tokens_1t, cache: model.apply({"params": params}, tokens_1t, cache,
                                                                  method=model.decode))
    decoded = []
    for prompt, completion in examples:
        cache = kv_cache.KVCache.zeros(model.cfg, jnp.zeros((1,), jnp.int32), len(prompt) + len(completion),
                                        prompt_end=len(prompt))
        logits_1v, cache = decode(params, prompt[None], cache)
        for token in completion:
            decoded.append(jax.nn.log_softmax(logits_1v[0])[token])
            logits_1v, cache = decode(params, token[None, None], cache)
    np.testing.assert_allclose(np.array(decoded), log_probs, atol=2e-5)
    # The positions matter: editing every position scores the completions differently.
    config_all = config.copy_and_resolve_references()
    config_all.finetune.loreft.positions = "all"
    assert float(jnp.abs(scored(params, lm_config.validate(config_all)) - log_probs).max()) > 1e-3


def test_lora_flops_count_its_adapters_and_no_weight_gradients_of_the_base():
    config, params = _initialised("lora")
    assert flops.adapter_matmul_count(config) == peft.count(peft.split(params)[1])
    base = peft.base_config(config)
    assert flops.train_flops_per_token(config, 16) - flops.attention_flops_per_token(config, 16) == (
        4 * flops.matmul_param_count(base) + 6 * peft.count(peft.split(params)[1]))
    assert flops.adapter_matmul_count(base) == 0


@pytest.mark.parametrize("init, a_learns, b_learns, changes_model", [
    ("a_gaussian_b_zero", False, True, False),  # Standard: the base at step 0; A waits for B to move.
    ("a_zero_b_gaussian", True, False, False),  # The base at step 0; B gets no gradient through A = 0.
    ("both_gaussian", True, True, True),  # Both learn, but the model is no longer the base.
])
def test_lora_initialisations_behave_as_the_notes_table_says(init, a_learns, b_learns, changes_model):
    config, params = _initialised("lora", init)
    base, adapters = peft.split(params)
    batch = {"inputs": TOKENS, "targets": jnp.roll(TOKENS, -1, axis=1)}
    model = model_lib.build(config)
    grads = jax.jit(jax.grad(lambda a: objective.lm_loss(peft.combine(base, a), batch, model, config)[0]))(adapters)
    flat = jax.tree_util.tree_leaves_with_path(grads)
    gradient = lambda name: sum(float(jnp.abs(g).sum()) for path, g in flat
                                if jax.tree_util.keystr(path).endswith(f"['{name}']"))
    assert (gradient("lora_a") > 0) == a_learns and (gradient("lora_b") > 0) == b_learns
    changed = not np.array_equal(logits(config, params, TOKENS), logits(peft.base_config(config), base, TOKENS))
    assert changed == changes_model


@pytest.mark.parametrize("scan_layers", [True, False])
def test_lora_merged_into_the_base_computes_the_same_logits(scan_layers):
    config, params = _initialised("lora", "both_gaussian", scan_layers)
    adapted = logits(config, params, TOKENS)
    merged = logits(peft.base_config(config), peft.merge_lora(params, config), TOKENS)
    base = logits(peft.base_config(config), peft.split(params)[0], TOKENS)
    assert float(jnp.abs(adapted - base).max()) > 1e-2  # The adapters matter...
    np.testing.assert_allclose(merged, adapted, atol=1e-5, rtol=1e-5)  # ...and merging keeps them.


def test_peft_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="config.init_from"):
        tiny_config("lora", init_from="")
    with pytest.raises(ConfigError, match="config.finetune.lora.targets"):
        tiny_config("lora", **{"finetune.lora.targets": ("query", "qkv")})
    with pytest.raises(ConfigError, match="config.finetune.loreft.layers"):
        tiny_config("loreft", **{"finetune.loreft.layers": (5,)})
    with pytest.raises(ConfigError, match="config.finetune.method"):
        tiny_config("adapters")
    with pytest.raises(ConfigError, match="config.finetune.objective='sft' trains on completions"):
        tiny_config("lora", **{"finetune.objective": "sft"})


# ---------------------------------------------------------------------------------------------------------------
# Runs: a base trained on synthetic tokens, adapters trained over it.


@pytest.fixture(scope="module")
def synthetic_base(tmp_path_factory) -> str:
    workdir = str(tmp_path_factory.mktemp("finetune") / "base")
    train_lib.train(tiny_config(**{"total_steps": 2, "checkpoint_every": 1}), workdir)  # Checkpoints 1 and 2.
    return workdir


def _peft_run(base: str, workdir: str, method: str = "lora", **overrides) -> str:
    train_lib.train(tiny_config(method, init_from=base, **overrides), workdir)
    return workdir


def _checkpoint_leaves(workdir: str, step: int) -> list[str]:
    """The paths of the arrays checkpoint `step` holds (its `state` item's metadata)."""
    metadata = checkpoint._reader(workdir).item_metadata(step).state
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(metadata)]


def _adapters_trained(params, config) -> bool:
    initial = peft.split(nn.unbox(jax.jit(lambda key: model_lib.init(model_lib.build(config), key))(
        jax.random.key(config.seed))))[1]
    return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(peft.split(params)[1]),
                                                         jax.tree.leaves(initial)))


def _losses(workdir: str) -> list[float]:
    return [json.loads(line)["loss"] for line in open(os.path.join(workdir, "metrics.jsonl")) if '"loss"' in line]


def test_a_lora_run_saves_adapters_only_points_to_its_base_and_resumes_exactly(synthetic_base, tmp_path,
                                                                               compilation_cache):
    straight = _peft_run(synthetic_base, str(tmp_path / "straight"))
    interrupted = str(tmp_path / "resumed")
    train_lib._faults.fail_at_step = 3  # A crash as step 3 starts; step 2's checkpoint is on disk.
    try:
        with pytest.raises(RuntimeError, match="injected failure"):
            _peft_run(synthetic_base, interrupted)
    finally:
        train_lib._faults.fail_at_step = None
    _peft_run(synthetic_base, interrupted)  # Resumes from step 2.
    assert _losses(straight) == _losses(interrupted)
    params_names = [name for name in _checkpoint_leaves(straight, 4) if name.startswith("['params']")]
    assert params_names and all(any(a in name for a in peft.ADAPTER_NAMES) for name in params_names), params_names
    config = lm_config.read_config(straight)
    base_dir, base_step = checkpoint.workdir_and_step(config.init_from)
    assert os.path.isabs(base_dir) and base_step == 2  # Pinned to the base's latest checkpoint.
    a, b = checkpoint.restore(straight), checkpoint.restore(interrupted)
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
    # Evaluation reads base + adapters as the trainer evaluated them at its last step.
    last_eval = [json.loads(line) for line in open(os.path.join(straight, "metrics.jsonl")) if "eval_loss" in line][-1]
    assert evaluate_lib.evaluate(a.config, a.params)["loss"] == pytest.approx(last_eval["eval_loss"], rel=1e-6)
    assert _adapters_trained(a.params, a.config)
    np.testing.assert_array_equal(  # The base is read back unchanged beside the trained adapters.
        peft.split(a.params)[0]["embed"]["embedding"], checkpoint.restore(synthetic_base).params["embed"]["embedding"])
    with pytest.raises(CheckpointError, match="holds adapters of the base"):
        train_lib.train(tiny_config("lora", init_from=f"{synthetic_base}:1", total_steps=6), straight)


@pytest.mark.parametrize("method", ["prefix", "loreft"])
def test_prefix_and_loreft_runs_train_adapters_that_evaluate_and_generate(synthetic_base, tmp_path, method):
    run = _peft_run(synthetic_base, str(tmp_path / method), method, total_steps=2)
    params_names = [name for name in _checkpoint_leaves(run, 2) if name.startswith("['params']")]
    assert params_names and all(f"'{'prefix' if method == 'prefix' else 'reft'}'" in name for name in params_names)
    restored = checkpoint.restore(run)
    assert _adapters_trained(restored.params, restored.config)
    tokens = generate.generate(restored.config, restored.params, [[1, 2, 3]], max_new_tokens=4)
    assert len(tokens[0]) == 4
    with pytest.raises(CheckpointError, match="cannot be merged"):
        convert.export_checkpoint(run, str(tmp_path / "out"))
    with pytest.raises(CheckpointError, match="PEFT adapters are exported from LoRA runs"):
        convert.export_adapter(run, str(tmp_path / "out"))


def test_lora_adapter_loads_in_peft_and_matches_lm(synthetic_base, tmp_path, compilation_cache):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft_hf = pytest.importorskip("peft")
    run = _peft_run(synthetic_base, str(tmp_path / "lora"))  # The resume test's config: compiled by then.
    convert.export_checkpoint(synthetic_base, str(tmp_path / "base_hf"))
    convert.export_adapter(run, str(tmp_path / "adapter"))
    convert.export_checkpoint(run, str(tmp_path / "merged_hf"))
    tokens = np.random.default_rng(0).integers(0, 128, (2, 16))
    restored = checkpoint.restore(run)
    lm_logits = np.asarray(logits(restored.config, restored.params, jnp.asarray(tokens)))
    base_logits = np.asarray(logits(peft.base_config(restored.config), peft.split(restored.params)[0], tokens))
    assert np.abs(lm_logits - base_logits).max() > 1e-3  # Four steps moved the adapters.
    load = lambda d: transformers.AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32)
    with torch.no_grad():
        peft_logits = peft_hf.PeftModel.from_pretrained(load(tmp_path / "base_hf"), tmp_path / "adapter")(
            torch.tensor(tokens)).logits.numpy()
        merged_logits = load(tmp_path / "merged_hf")(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(peft_logits, lm_logits, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(merged_logits, lm_logits, atol=1e-4, rtol=1e-4)


def test_lora_on_a_2x2x2_mesh_matches_one_device():
    config = tiny_config("lora", **{"optim.learning_rate": 1e-2})
    base = peft.split(nn.unbox(model_lib.init(model_lib.build(config), jax.random.key(7))))[0]  # For both meshes.
    losses = {}
    for name, mesh, devices in (("one", (1, 1, 1), jax.devices()[:1]), ("mesh", (2, 2, 2), jax.devices())):
        placed = config.copy_and_resolve_references()
        placed.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
        training = train_step_lib.build(placed, devices)
        frozen = jax.device_put(base, training.shardings.frozen)
        state, step = training.init_state(), training.train_step()
        losses[name] = []
        for _ in range(10):
            tokens = np.random.default_rng(0).integers(0, 128, (8, 17)).astype(np.int32)
            batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((8, 16), np.float32)}
            state, metrics = step(state, jax.device_put(batch, training.shardings.batch), frozen)
            losses[name].append(float(metrics["loss"]))
    assert losses["one"][-1] < losses["one"][0] - 0.05  # The adapters learn the repeated batch.
    np.testing.assert_allclose(losses["mesh"], losses["one"], atol=1e-5, rtol=0)


def test_lora_optimizer_state_is_under_1_percent_of_full_and_its_step_needs_less_memory():
    config = finetune_bench.benchmark_config()
    config.model.update(d_model=256, num_layers=2, num_heads=4, num_kv_heads=4, mlp_dim=688)
    full, lora = (finetune_bench.compiled_memory(config, method) for method in ("full", "lora"))
    assert lora["optimizer_bytes"] < 0.01 * full["optimizer_bytes"], (lora, full)
    assert lora["temp_bytes"] < full["temp_bytes"], (lora, full)
    assert lora["trainable"] < 0.01 * full["trainable"]


def test_preflight_sizes_a_lora_run_by_its_adapters():
    config = lm_config.load("configs/llama_1b.py", **{"finetune.method": "lora", "init_from": "base"})
    full = lm_config.load("configs/llama_1b.py")
    sizes = {"data": 1, "fsdp": 8, "tensor": 1}
    lora, reference = preflight.estimate(config, sizes), preflight.estimate(full, sizes)
    for stage in range(4):
        assert lora.stages[stage].opt_state < 0.01 * reference.stages[stage].opt_state
        assert lora.stages[stage].grads < 0.01 * reference.stages[stage].grads
    assert lora.flops_per_step < reference.flops_per_step  # No weight gradients of the frozen base.


# ---------------------------------------------------------------------------------------------------------------
# Supervised fine-tuning data.

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
          "+ message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 "
          "== 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt "
          "%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
HF_SPECIALS = ["<|begin_of_text|>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>",
               "<|eot_id|>", "<|pad|>"]


def _hf_tokenizer_dir(directory, template: str, eos: str) -> str:
    """A byte-level BPE `tokenizer.json` (trained on the toy corpus) with the chat special tokens, and its
    `tokenizer_config.json` carrying `template`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(RECORDS_CORPUS.splitlines(), trainers.BpeTrainer(
        vocab_size=400, special_tokens=HF_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    os.makedirs(directory, exist_ok=True)
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|begin_of_text|>", "eos_token": eos, "pad_token": "<|pad|>", "chat_template": template,
                   "tokenizer_class": "PreTrainedTokenizerFast"}, f)
    return os.path.join(directory, "tokenizer.json")


def _runs(tokenizer, ids, trained):
    """The example as `(trained, text)` runs, each decoded by the tokenizer itself, special tokens written out."""
    def text(run_ids):
        if isinstance(tokenizer, tokenizer_lib.HuggingFaceTokenizer):
            return tokenizer.tokenizer.decode(run_ids, skip_special_tokens=False)
        p = tokenizer.processor  # SentencePiece drops control tokens when decoding: write them out.
        parts = [[i] for i in run_ids]
        return "".join(p.id_to_piece(i[0]) if p.is_control(i[0]) else p.decode(i) for i in parts)
    return [(bool(flag), text([int(i) for i, _ in group]))
            for flag, group in itertools.groupby(zip(ids, trained), key=lambda pair: pair[1])]


def _tokenized(tokenizer_path, record, data_format, chat_template=""):
    config = lm_config.base_config()
    config.data.chat_template = chat_template
    tokenizer = tokenizer_lib.load(tokenizer_path)
    template, add_bos = sft.chat_template(config, tokenizer)
    ids, trained = sft.tokenize(sft.Record("x.jsonl:1", record), data_format, tokenizer, template, add_bos)
    return tokenizer, ids, trained


def test_prompt_completion_mask_is_the_completion_and_eos(sentencepiece_tokenizer):
    tokenizer, ids, trained = _tokenized(sentencepiece_tokenizer, {"prompt": "Q: 2+2?\nA:", "completion": " 4"},
                                         "prompt_completion")
    assert _runs(tokenizer, ids, trained) == [(False, "<s>Q: 2+2?\nA:"), (True, " 4</s>")]


def test_plain_chat_template_mask_is_every_assistant_turn(sentencepiece_tokenizer):
    tokenizer, ids, trained = _tokenized(sentencepiece_tokenizer, {"messages": MESSAGES}, "chat")
    assert _runs(tokenizer, ids, trained) == [
        (False, "<s>System: Be brief.\nUser: hi\nAssistant:"), (True, " hello</s>"),
        (False, "User: 2+2?\nAssistant:"), (True, " 4</s>")]


@pytest.mark.parametrize("template, eos, expected", [
    (CHATML, "<|im_end|>", [
        (False, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"),
        (True, "hello<|im_end|>\n"), (False, "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"),
        (True, "4<|im_end|>\n")]),
    (LLAMA3, "<|eot_id|>", [
        (False, "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
                "\n\n"),
        (True, "hello<|eot_id|>"),
        (False, "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|><|start_header_id|>assistant"
                "<|end_header_id|>\n\n"),
        (True, "4<|eot_id|>")]),
], ids=["chatml", "llama3"])
def test_hugging_face_chat_templates_mask_assistant_turns_and_match_transformers(tmp_path, template, eos, expected):
    transformers = pytest.importorskip("transformers")
    path = _hf_tokenizer_dir(tmp_path, template, eos)
    tokenizer, ids, trained = _tokenized(path, {"messages": MESSAGES}, "chat")
    assert _runs(tokenizer, ids, trained) == expected
    reference = transformers.PreTrainedTokenizerFast(tokenizer_file=path, bos_token="<|begin_of_text|>",
                                                     eos_token=eos, pad_token="<|pad|>")
    reference.chat_template = template
    assert chat.render(template, MESSAGES, tokenizer.special_tokens()) == reference.apply_chat_template(
        MESSAGES, tokenize=False)
    reference_ids = reference.apply_chat_template(MESSAGES, tokenize=True)
    reference_ids = reference_ids["input_ids"] if hasattr(reference_ids, "keys") else reference_ids
    assert [int(i) for i in ids] == list(reference_ids)


def _records_file(path, records) -> str:
    with open(path, "w") as f:
        for record in records:
            f.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return str(path)


def _sft_config(files, tokenizer_path, data_format="prompt_completion", **data):
    config = tiny_config(**{"data.source": "files", "data.files": files, "data.format": data_format,
                            "data.tokenizer.path": tokenizer_path, "model.vocab_size": 384, "data.seq_len": 32})
    config.data.update(data)
    return lm_config.validate(config)


GOOD = {"prompt": "Q: 2+2?\nA:", "completion": " 4"}


@pytest.mark.parametrize("data_format, bad, message", [
    ("prompt_completion", "{not json", "not a JSON object"),
    ("prompt_completion", {"prompt": "Q"}, "needs a string field 'completion'"),
    ("prompt_completion", {"prompt": "Q", "completion": 4}, "needs a string field 'completion' (got int)"),
    ("prompt_completion", {"prompt": "Q", "completion": ""}, "empty 'completion'"),
    ("chat", {"messages": []}, "needs 'messages'"),
    ("chat", {"messages": [{"role": "bot", "content": "x"}]}, "message 0 has role 'bot'"),
    ("chat", {"messages": [{"role": "user", "content": "x"}]}, "must end with an assistant message"),
    ("chat", {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "y"}]},
     "message 0 needs a string 'content'"),
])
def test_a_malformed_record_is_one_line_naming_file_and_line(tmp_path, sentencepiece_tokenizer, data_format, bad,
                                                              message):
    good = GOOD if data_format == "prompt_completion" else {"messages": MESSAGES}
    files = _records_file(tmp_path / "records.jsonl", [good, good, bad])
    with pytest.raises(RecordError, match=r"records\.jsonl:3: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        sft.resolve(_sft_config(files, sentencepiece_tokenizer, data_format), "train")


def _all_records(config) -> sft.SftSplit:
    train, validation = (sft.resolve(config, s) for s in sft.SPLITS)
    return sft.SftSplit("train", config.data.format, train.records + validation.records, "all", "x")


def test_overlong_examples_are_truncated_or_dropped_and_counted(tmp_path, sentencepiece_tokenizer):
    long_prompt = {"prompt": "reverse: a b c " * 12 + "\nanswer:", "completion": " c b a"}
    long_completion = {"prompt": "Q:", "completion": " hello it is 4." * 12}
    files = _records_file(tmp_path / "r.jsonl", [GOOD] * 30 + [long_prompt] * 3 + [long_completion] * 2)
    tokenizer = tokenizer_lib.load(sentencepiece_tokenizer)
    truncated = sft.examples(_sft_config(files, sentencepiece_tokenizer), _all_records(
        _sft_config(files, sentencepiece_tokenizer)), tokenizer)
    assert (len(truncated.examples), truncated.truncated, truncated.dropped_untrained) == (32, 5, 3)
    assert all(len(e["tokens"]) <= 33 and e["trained"][1:].any() for e in truncated.examples)
    config = _sft_config(files, sentencepiece_tokenizer, overlong="drop")
    dropped = sft.examples(config, _all_records(config), tokenizer)
    assert (len(dropped.examples), dropped.dropped_overlong, dropped.truncated) == (30, 5, 0)
    assert "5 dropped for being longer than seq_len + 1 = 33 tokens" in dropped.report(_all_records(config), 32)
    only_long = _records_file(tmp_path / "long.jsonl", [long_prompt] * 40)
    with pytest.raises(EmptyDatasetError, match="no example is left to train on"):
        config = _sft_config(only_long, sentencepiece_tokenizer)
        sft.examples(config, _all_records(config), tokenizer)


def test_fine_tuning_batches_resume_exactly(tmp_path, sentencepiece_tokenizer):
    files = _records_file(tmp_path / "r.jsonl", [{"prompt": f"Q: {i}+{i}?\nA:", "completion": f" {2 * i}"}
                                                 for i in range(100)])
    config = _sft_config(files, sentencepiece_tokenizer)
    tokenizer = tokenizer_lib.load(sentencepiece_tokenizer)
    straight = pipeline.make_train_iterator(config, tokenizer=tokenizer)
    expected = [next(straight) for _ in range(12)]  # More than one epoch of ~95 examples, 8 rows of 2-3.
    first = pipeline.make_train_iterator(config, tokenizer=tokenizer)
    for _ in range(5):
        next(first)
    state = json.loads(json.dumps(first.get_state()))  # As the checkpoint stores it.
    resumed = pipeline.make_train_iterator(config, tokenizer=tokenizer)
    resumed.set_state(state)
    for batch in expected[5:]:
        got = next(resumed)
        assert all(np.array_equal(got[k], batch[k]) for k in batch)
    assert all(batch["weights"].sum() > 0 for batch in expected)
    for iterator in (straight, first, resumed):
        iterator.close()


def test_packed_rows_give_the_loss_of_one_example_per_row(tmp_path, sentencepiece_tokenizer):
    rng = random.Random(0)
    records = [{"prompt": f"reverse: {' '.join(xs)}\nanswer:", "completion": " " + " ".join(xs[::-1])}
               for xs in (rng.sample("abcdefgh", rng.randint(1, 5)) for _ in range(60))]
    files = _records_file(tmp_path / "r.jsonl", records)
    model_config = _sft_config(files, sentencepiece_tokenizer, seq_len=64)
    model = model_lib.build(model_config)
    params = nn.unbox(model_lib.init(model, jax.random.key(0)))
    loss = jax.jit(lambda batch: objective.lm_loss(params, batch, model, model_config)[1])
    tokenizer = tokenizer_lib.load(sentencepiece_tokenizer)
    totals = {}
    for pack in (True, False):
        config = _sft_config(files, sentencepiece_tokenizer, pack=pack, seq_len=64)
        nll = weight = rows = 0.0
        for batch in pipeline.make_eval_iterator(config, tokenizer=tokenizer, split="train"):
            aux = loss(batch)
            nll += float(aux["nll"]) * float(aux["weight_sum"])
            weight += float(aux["weight_sum"])
            rows += float((batch["segment_ids"].max(axis=1) > 0).sum())
        totals[pack] = (nll / weight, weight, rows)
    assert totals[True][1] == totals[False][1]  # The same trained tokens...
    assert totals[True][2] < totals[False][2] / 2  # ...in far fewer rows...
    np.testing.assert_allclose(totals[True][0], totals[False][0], rtol=1e-5)  # ...with the same loss.
