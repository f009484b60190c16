"""Hugging Face interop against transformers itself: tiny random models of every supported architecture and option
are built and saved here (`save_pretrained`), imported with `lm.hf`, and compared: logits on a 512-token prompt,
greedy generation, and HF -> lm -> HF tensors bit for bit."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
import torch
import transformers

from lm import checkpoint
from lm import config as lm_config
from lm import errors as lm_errors
from lm import generate as generate_lib
from lm import model as model_lib
from lm import sharding as sharding_lib
from lm.data import sources
from lm.data import tokenizer as tokenizer_lib
from lm.hf import convert, weights

from conftest import REPO, environment

VOCAB = 512
PROMPT_LENGTH = 512
FP32 = {"model.dtype": "float32"}

# Weights at transformers' default initializer_range (0.02), the scale of real checkpoints' weights.
LLAMA = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=None, eos_token_id=None)
MODELS = {
    "llama3 rope scaling": (transformers.LlamaConfig, dict(
        LLAMA, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 64})),
    "llama linear rope, head_dim, biases, tied": (transformers.LlamaConfig, dict(
        LLAMA, head_dim=32, attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
        rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "mistral": (transformers.MistralConfig, dict(LLAMA, sliding_window=None)),
    "qwen2": (transformers.Qwen2Config, dict(LLAMA, tie_word_embeddings=True, rope_theta=1e6)),
    "gpt2": (transformers.GPT2Config, dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=1024,
                                           bos_token_id=None, eos_token_id=None)),
}


MULTILINGUAL = ("The quick brown fox jumps over the lazy dog. Der schnelle braune Fuchs springt über den faulen "
                "Hund. Η γρήγορη καφέ αλεπού. 敏捷的棕色狐狸跳过了懒狗。素早い茶色の狐。 الثعلب البني 🦊🐕\n\ttabs  and  "
                "spaces\r\n")


@pytest.fixture(scope="module")
def hf_tokenizer():
    return make_hf_tokenizer()


def make_hf_tokenizer():
    """A byte-level BPE tokenizer (as GPT-2, Llama 3 and Qwen2 have) trained here, with BOS/EOS/PAD tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([MULTILINGUAL * 3, "hello world, the model reads text"] * 20, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>")


SENTENCEPIECE_STYLES = ("prepend", "metaspace")


def make_sentencepiece_style_tokenizer(style="prepend"):
    """A BPE tokenizer of SentencePiece's kind as transformers converts them to `tokenizer.json`: spaces are "▁",
    a "▁" goes in front of every text, characters outside the vocabulary fall back to byte pieces `<0xNN>`, and
    decoding drops the leading space again. `prepend` as Llama 2 and Mistral 7B v0.1 (a `Prepend` normalizer),
    `metaspace` as newer conversions (a `Metaspace` pre-tokenizer that prepends to the first word)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    specials = ["<unk>", "<s>", "</s>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    if style == "prepend":
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    # A small alphabet, so that the rarer characters of the text are spelled in byte pieces.
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=specials + byte_pieces, limit_alphabet=40)
    tokenizer.train_from_iterator([MULTILINGUAL * 3, "hello world, the model reads text"] * 20, trainer)
    spec = json.loads(tokenizer.to_str())
    # The trainer lists the byte pieces as added tokens; in SentencePiece models they are ordinary pieces.
    spec["added_tokens"] = [token for token in spec["added_tokens"] if token["content"] in specials]
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")


def make_tokenizer(name):
    """The tokenizer saved with `MODELS[name]`: SentencePiece-style for Mistral (as Mistral's own), byte-level BPE
    for the others."""
    return make_sentencepiece_style_tokenizer() if name == "mistral" else make_hf_tokenizer()


def save_hf_model(name, directory, tokenizer):
    """The random model `MODELS[name]`, saved with `save_pretrained` into `directory` with `tokenizer`."""
    config_class, kwargs = MODELS[name]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_class(**kwargs), attn_implementation="eager")
    model.eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model


@pytest.fixture(scope="module", params=list(MODELS))
def hf_model(request, tmp_path_factory):
    """`(name, directory, torch model)` of each architecture, saved with `make_tokenizer(name)`."""
    directory = tmp_path_factory.mktemp("hf") / "model"
    return request.param, str(directory), save_hf_model(request.param, directory, make_tokenizer(request.param))


def prompt_tokens(length=PROMPT_LENGTH, batch=2, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length))


def hf_logits(model, tokens_bt):
    with torch.no_grad():
        return model(torch.tensor(tokens_bt)).logits.numpy()


def lm_logits(config, params, tokens_bt):
    model = model_lib.build(config)

    def forward(params, tokens_bt):
        hidden_btd = model.apply({"params": params}, tokens_bt)
        return model.apply({"params": params}, hidden_btd, method=model_lib.Transformer.logits)

    return np.asarray(jax.jit(forward)(params, jnp.asarray(tokens_bt)))


def test_imported_logits_match_transformers_on_a_512_token_prompt(hf_model, tmp_path):
    name, directory, model = hf_model
    workdir = str(tmp_path / "workdir")
    convert.import_checkpoint(directory, workdir, FP32)
    restored = checkpoint.restore(workdir)
    tokens_bt = prompt_tokens()
    expected = hf_logits(model, tokens_bt)
    got = lm_logits(restored.config, restored.params, tokens_bt)
    largest, error = np.abs(expected).max(), np.abs(got - expected).max()
    assert largest > 0.5, "logits this small would hide errors"
    bound = min(1e-4, 1e-6 * largest)
    assert error <= bound, (error, largest)
    if restored.config.model.rope_scaling.type != "none":  # The comparison can fail: without the scaling it does.
        unscaled = restored.config.copy_and_resolve_references()
        unscaled.model.rope_scaling.type = "none"
        assert np.abs(lm_logits(unscaled, restored.params, tokens_bt) - expected).max() > 100 * bound


def test_greedy_generation_matches_transformers(hf_model, tmp_path):
    name, directory, model = hf_model
    config = convert.config_for(directory, FP32)
    params, _ = convert.load_params(directory, config)
    prompt_bt = prompt_tokens(length=12, batch=1, seed=1)
    with torch.no_grad():
        expected = model.generate(torch.tensor(prompt_bt), max_new_tokens=32, do_sample=False, min_new_tokens=32,
                                  pad_token_id=0)[0, 12:].tolist()
    got = generate_lib.generate(config, params, prompt_bt.tolist(), max_new_tokens=32,
                                sampling=generate_lib.Sampling(0.0, 0, 1.0), seed=0, eos_id=None, pad_id=0)
    assert got[0] == expected


def test_hf_to_lm_to_hf_is_bit_identical(hf_model, tmp_path):
    name, directory, model = hf_model
    workdir, out = str(tmp_path / "workdir"), str(tmp_path / "exported")
    convert.import_checkpoint(directory, workdir)
    files = convert.export_checkpoint(workdir, out, max_shard_bytes=100_000)  # Small shards: the index is used.
    assert len(files) > 1 and os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    original = read_all(directory)
    exported = read_all(out)
    assert sorted(exported) == sorted(original)
    for key, array in original.items():
        assert exported[key].dtype == array.dtype and np.array_equal(exported[key], array), key
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    if model.config.tie_word_embeddings:
        assert reloaded.get_output_embeddings().weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()
    tokens_bt = prompt_tokens(length=64)
    np.testing.assert_array_equal(hf_logits(reloaded.eval(), tokens_bt), hf_logits(model, tokens_bt))


def test_a_run_of_lm_exports_with_its_own_tokenizer(small_run, tmp_path):
    """A run trained by lm (its own SentencePiece tokenizer, 8 devices) exports as a LlamaForCausalLM: transformers
    computes lm's logits, and AutoTokenizer encodes and decodes as lm's tokenizer, BOS first."""
    out = str(tmp_path / "exported")
    convert.export_checkpoint(small_run, out)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, output_loading_info=True, attn_implementation="eager", dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(model).__name__ == "LlamaForCausalLM"
    restored = checkpoint.restore(small_run)
    config = restored.config.copy_and_resolve_references()
    config.model.dtype = "float32"
    tokens_bt = np.random.default_rng(0).integers(0, config.model.vocab_size, (2, config.data.seq_len))
    expected, got = hf_logits(model.eval(), tokens_bt), lm_logits(config, restored.params, tokens_bt)
    assert np.abs(got - expected).max() <= 1e-4 and np.abs(expected).max() > 0.5

    ours = tokenizer_lib.from_workdir(small_run)
    reference = transformers.AutoTokenizer.from_pretrained(out)
    text = MULTILINGUAL + "def f(x):\n        return  x  +  1\n\n"
    ids = ours.encode(text)
    assert reference.encode(text, add_special_tokens=False) == ids
    assert reference(text).input_ids == [ours.bos_id, *ids]
    assert reference.decode(ids) == ours.decode(ids) == text
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (
        ours.bos_id, ours.eos_id, ours.pad_id) == (reference.bos_token_id, reference.eos_token_id,
                                                   reference.pad_token_id)


@pytest.mark.parametrize("settings", [{}, {"add_dummy_prefix": True}, {"normalization_rule_name": "nmt_nfkc"}],
                         ids=["lm's own", "dummy prefix", "nfkc"])
def test_sentencepiece_bpe_models_convert_to_tokenizer_json_exactly(settings, tmp_path):
    import io

    import sentencepiece as spm
    from tokenizers import Tokenizer

    from lm.data import tokenizer_training
    from lm.hf import sentencepiece

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([MULTILINGUAL * 2, "def f(x):\n    return  x  +  1\n\n" * 3] * 10),
        model_writer=model, model_type="bpe", vocab_size=400, byte_fallback=True, pad_id=0, bos_id=1, eos_id=2,
        unk_id=3, **{**tokenizer_training._TRAINER_OPTIONS, **settings})
    ours = tokenizer_lib.SentencePieceTokenizer(spm.SentencePieceProcessor(model_proto=model.getvalue()))
    if settings.get("normalization_rule_name") == "nmt_nfkc":
        with pytest.raises(lm_errors.ConfigError, match="normalizes text \\(rule 'nmt_nfkc'"):
            sentencepiece.convert(ours, 1024)
        return
    fast = Tokenizer.from_str(sentencepiece.convert(ours, 1024)[tokenizer_lib.HF_FILE].decode())
    for text in (MULTILINGUAL, "  two leading spaces", "trailing  ", "x = 12345 +  3.14\n\n\n\tend", "unseen: € ß"):
        ids = ours.encode(text)
        assert fast.encode(text, add_special_tokens=False).ids == ids, text
        assert fast.decode(ids) == ours.decode(ids), text
    assert any(piece.startswith("<0x") for piece in map(fast.id_to_token, ours.encode("€")))


def read_all(directory):
    tensors = {}
    for file in os.listdir(directory):
        if file.endswith(".safetensors"):
            with safe_open(os.path.join(directory, file), framework="pt") as f:
                tensors.update({key: f.get_tensor(key).float().numpy() if f.get_tensor(key).dtype == torch.bfloat16
                                else f.get_tensor(key).numpy() for key in f.keys()})
    return tensors


def test_unscanned_layers_import_and_export_like_scanned_ones(hf_model, tmp_path):
    """`scan_layers=False` (one parameter subtree per layer) reads and writes the same tensors."""
    _, directory, model = hf_model
    config = convert.config_for(directory, {**FP32, "model.scan_layers": False})
    params, _ = convert.load_params(directory, config)
    assert "layers_1" in params and "layers" not in params
    tokens_bt = prompt_tokens(length=64)
    np.testing.assert_allclose(lm_logits(config, params, tokens_bt), hf_logits(model, tokens_bt), atol=1e-4, rtol=0)
    weights.save_params(params, config, str(tmp_path), max_shard_bytes=10**9)
    original, exported = read_all(directory), read_all(tmp_path)
    assert sorted(exported) == sorted(original)
    assert all(np.array_equal(exported[key], original[key]) for key in original)


def test_bfloat16_weights_stay_bfloat16_both_ways(hf_tokenizer, tmp_path):
    directory, workdir, out = tmp_path / "hf", str(tmp_path / "workdir"), str(tmp_path / "exported")
    model = save_hf_model("qwen2", directory, hf_tokenizer).to(torch.bfloat16)
    model.save_pretrained(directory)
    config = convert.import_checkpoint(str(directory), workdir)
    assert config.model.param_dtype == "bfloat16"
    assert {leaf.dtype for leaf in jax.tree.leaves(checkpoint.restore(workdir).params)} == {jnp.dtype(jnp.bfloat16)}
    convert.export_checkpoint(workdir, out)
    with safe_open(os.path.join(out, "model.safetensors"), framework="pt") as exported, \
            safe_open(os.path.join(directory, "model.safetensors"), framework="pt") as original:
        assert sorted(exported.keys()) == sorted(original.keys())
        for key in original.keys():
            a, b = original.get_tensor(key), exported.get_tensor(key)
            assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b), key
    assert json.loads(open(os.path.join(out, "config.json")).read())["dtype"] == "bfloat16"


def test_import_on_a_2x2x2_mesh_equals_import_on_one_device(hf_model):
    name, directory, _ = hf_model
    config = convert.config_for(directory, {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    on_eight, shardings = convert.load_params(directory, config)
    assert shardings.mesh.devices.size == 8
    spread = [leaf for leaf in jax.tree.leaves(on_eight) if len(leaf.sharding.device_set) > 1
              and not leaf.sharding.is_fully_replicated]
    assert spread, "nothing was sharded"
    single = config.copy_and_resolve_references()
    single.mesh.update(data=1, fsdp=1, tensor=1)
    on_one, _ = convert.load_params(directory, single, sharding_lib.make_mesh(single.mesh, jax.devices()[:1]))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), on_eight, on_one)


def test_imported_tokenizer_encodes_and_decodes_like_transformers(hf_model, tmp_path):
    _, directory, _ = hf_model
    workdir = str(tmp_path / "workdir")
    convert.import_checkpoint(directory, workdir)
    tokenizer = tokenizer_lib.from_workdir(workdir)
    reference = transformers.AutoTokenizer.from_pretrained(directory)
    assert isinstance(tokenizer, tokenizer_lib.HuggingFaceTokenizer)
    assert tokenizer.encode(MULTILINGUAL) == reference.encode(MULTILINGUAL, add_special_tokens=False)
    assert tokenizer.decode(tokenizer.encode(MULTILINGUAL)) == MULTILINGUAL
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (
        reference.bos_token_id, reference.eos_token_id, reference.pad_token_id)
    sentencepiece_style = "▁" in "".join(reference.convert_ids_to_tokens(reference.encode("a b")))
    assert tokenizer.prefix_bytes() == (1 if sentencepiece_style else 0)
    table = tokenizer.token_bytes(VOCAB)
    assert table[tokenizer.encode(MULTILINGUAL)].sum() - tokenizer.prefix_bytes() == len(MULTILINGUAL.encode("utf-8"))


@pytest.mark.parametrize("style", SENTENCEPIECE_STYLES)
def test_sentencepiece_style_tokenizers_encode_like_transformers_and_count_the_text_bytes(style, tmp_path):
    """Both ways transformers writes SentencePiece models as tokenizer.json; the dummy prefix "▁" that encoding puts
    in front of a text is no byte of it, and byte-fallback pieces are one byte each."""
    make_sentencepiece_style_tokenizer(style).save_pretrained(tmp_path)
    tokenizer = tokenizer_lib.load(str(tmp_path))
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ids = tokenizer.encode(MULTILINGUAL)
    assert ids == reference.encode(MULTILINGUAL, add_special_tokens=False)
    assert any(piece.startswith("<0x") for piece in reference.convert_ids_to_tokens(ids)), "no byte fallback tested"
    assert tokenizer.decode(ids) == MULTILINGUAL
    assert tokenizer.prefix_bytes() == 1
    table = tokenizer.token_bytes(VOCAB)
    for text in (MULTILINGUAL, "a", "Der schnelle", "🦊 and 素早い"):
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert table[ids].sum() - tokenizer.prefix_bytes() == len(text.encode("utf-8")), text


DOCUMENTS = [f"Document {i}: " + MULTILINGUAL[i * 7:i * 7 + 60 + 5 * i] for i in range(12)]


def test_evaluate_on_an_imported_model_matches_transformers(hf_model, tmp_path, run_lm, lm_cache):
    """Loss and bits per byte of `lm.evaluate` against the same documents scored by transformers, each document
    `[BOS] text [EOS]` (shorter than the window, so scored whole)."""
    _, directory, model = hf_model
    workdir, data = str(tmp_path / "workdir"), tmp_path / "documents.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in DOCUMENTS))
    run_lm("lm.hf", "import", f"--hf={directory}", f"--workdir={workdir}", "--config.model.dtype=float32")
    overrides = ["--config.data.source=files", f"--config.data.files={data}", "--config.data.eval_split=train",
                 f"--config.data.cache_dir={lm_cache}", "--config.data.seq_len=256", "--config.data.batch_size=4"]
    run_lm("lm.evaluate", f"--workdir={workdir}", *overrides)
    with open(os.path.join(workdir, "eval_0.json")) as f:
        results = json.load(f)
    config = lm_config.read_config(workdir)
    config.update_from_flattened_dict({"data.source": "files", "data.files": str(data), "data.cache_dir": lm_cache})
    texts = list(sources.iter_texts(sources.resolve(config, "train")))
    assert 0 < len(texts) <= len(DOCUMENTS) and set(texts) <= set(DOCUMENTS)
    reference = transformers.AutoTokenizer.from_pretrained(directory)
    nll, tokens = 0.0, 0
    for text in texts:
        ids = [reference.bos_token_id, *reference.encode(text, add_special_tokens=False), reference.eos_token_id]
        with torch.no_grad():
            logits = model(torch.tensor([ids[:-1]])).logits[0].double()
        nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))
        tokens += len(ids) - 1
    text_bytes = sum(len(text.encode("utf-8")) for text in texts)
    assert results["tokens"] == tokens and results["bytes"] == text_bytes
    assert abs(results["loss"] - nll / tokens) < 1e-4
    assert abs(results["bits_per_byte"] - nll / np.log(2) / text_bytes) < 1e-4


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, hf_tokenizer):
    directory = tmp_path_factory.mktemp("llama") / "model"
    save_hf_model("llama3 rope scaling", directory, hf_tokenizer)
    return directory


def test_training_starts_from_an_imported_model_or_a_hugging_face_directory(llama_dir, tmp_path, run_lm):
    hf_dir = llama_dir
    imported = tmp_path / "imported"
    run_lm("lm.hf", "import", f"--hf={hf_dir}", f"--workdir={imported}")
    run = ["--config=configs/tiny.py", "--config.total_steps=2", "--config.data.seq_len=32",
           "--config.data.batch_size=8",
           "--config.eval_every=2", "--config.eval_steps=1", "--config.checkpoint_every=2",
           "--config.optim.warmup_steps=1", "--config.optim.learning_rate=1e-3"]
    sampled = run_lm("lm.generate", f"--workdir={imported}", "--prompt=Der schnelle", "--max_new_tokens=8")
    assert "(step 0)\nDer schnelle" in sampled.stdout
    refused = run_lm("lm.train", f"--workdir={imported}", *run, check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "holds a model imported from Hugging Face" in refused.stderr.strip().splitlines()[-1]
    source = checkpoint.restore(str(imported))
    for i, init_from in enumerate([str(imported), f"{imported}:0", str(hf_dir)]):
        workdir = tmp_path / f"run_{i}"
        result = run_lm("lm.train", f"--workdir={workdir}", *run, f"--config.init_from={init_from}")
        assert f"initialized from {init_from}" in result.stdout
        trained = checkpoint.restore(str(workdir))
        for field in ("vocab_size", "d_model", "num_layers", "num_kv_heads", "rope_scaling", "rope_theta"):
            assert trained.config.model[field] == source.config.model[field], field
        assert isinstance(tokenizer_lib.from_workdir(str(workdir)), tokenizer_lib.HuggingFaceTokenizer)
        # Two Adam steps of 1e-3 move each weight by about 2e-3 at most; a random init would be ~0.1 away.
        distance = max(float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())
                       for a, b in zip(jax.tree.leaves(trained.params), jax.tree.leaves(source.params)))
        assert 0 < distance < 5e-3, distance


def test_a_reward_model_starts_from_a_hugging_face_directory(llama_dir, tmp_path):
    """The source has no scalar head: the trunk is read from it and the new head starts at 0 (`lm.reward`)."""
    from lm import train as train_lib

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Der {i}", "chosen": " schnelle", "rejected": " langsame"}) + "\n"
                             for i in range(8)))
    config = lm_config.base_config()
    config.data.update(source="files", files=str(pairs), format="preference", seq_len=16, batch_size=8,
                       eval_split="train")
    config.finetune.objective = "reward"
    config.update(init_from=str(llama_dir), total_steps=1, log_every=1, eval_every=1, eval_steps=1,
                  checkpoint_every=1)
    last = train_lib.train(config, str(tmp_path / "reward_model"))
    assert last["pairs"] == 4 and last["eval_pairs"] == 4  # 8 rows: 4 pairs.
    trained = checkpoint.restore(str(tmp_path / "reward_model"))
    assert trained.params["scalar_head"].shape == (trained.config.model.d_model,)
    with pytest.raises(lm_errors.CheckpointError, match="is a reward model"):
        convert.export_checkpoint(str(tmp_path / "reward_model"), str(tmp_path / "exported"))


def edited_copy(directory, destination, **changes):
    """A copy of the model directory with `config.json` fields changed."""
    import shutil

    shutil.copytree(directory, destination)
    config = json.loads((destination / "config.json").read_text())
    config.update(changes)
    (destination / "config.json").write_text(json.dumps(config))
    return destination


@pytest.mark.parametrize("case", ["architecture", "rope type", "sliding window", "shape", "no weights",
                                  "workdir has checkpoints", "export into a non-empty directory", "no command",
                                  "no --hf"])
def test_bad_imports_and_exports_get_one_line(case, llama_dir, tmp_path, run_lm):
    workdir = tmp_path / "workdir"
    source = llama_dir
    if case == "architecture":
        source, expected = edited_copy(llama_dir, tmp_path / "m", architectures=["FalconForCausalLM"]), \
            "architecture 'FalconForCausalLM' is not supported"
    elif case == "rope type":
        source, expected = edited_copy(llama_dir, tmp_path / "m", rope_parameters={
            "rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "rope scaling type 'yarn' is not supported"
    elif case == "sliding window":
        source, expected = edited_copy(llama_dir, tmp_path / "m", architectures=["MistralForCausalLM"],
                                       model_type="mistral", sliding_window=256), \
            "sliding_window=256 is shorter than config.model.max_seq_len=1024"
    elif case == "shape":
        source, expected = edited_copy(llama_dir, tmp_path / "m", intermediate_size=96), \
            "down_proj.weight' has shape [64, 128], expected [64, 96] from config.json"
    elif case == "no weights":
        source = edited_copy(llama_dir, tmp_path / "m")
        os.remove(source / "model.safetensors")
        expected = "has neither model.safetensors nor model.safetensors.index.json"
    elif case == "workdir has checkpoints":
        run_lm("lm.hf", "import", f"--hf={llama_dir}", f"--workdir={workdir}")
        expected = "already holds checkpoints; import into a new workdir"
    if case == "export into a non-empty directory":
        run_lm("lm.hf", "import", f"--hf={llama_dir}", f"--workdir={workdir}")
        args = ["export", f"--workdir={workdir}", f"--out={llama_dir}"]
        expected = "exists and is not an empty directory"
    elif case == "no command":
        args, expected = [f"--hf={source}", f"--workdir={workdir}"], "usage: python -m lm.hf import|export"
    elif case == "no --hf":
        args, expected = ["import", f"--workdir={workdir}"], "python -m lm.hf import needs --hf"
    else:
        args = ["import", f"--hf={source}", f"--workdir={workdir}"]
    before = sorted(os.listdir(workdir)) if workdir.exists() else None
    result = run_lm("lm.hf", *args, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert expected in result.stderr.strip().splitlines()[-1], result.stderr[-500:]
    assert (sorted(os.listdir(workdir)) if workdir.exists() else None) == before


def test_a_hub_id_is_downloaded_with_huggingface_hub(llama_dir, tmp_path, monkeypatch):
    """Offline here: `snapshot_download` is replaced by one that serves the local model directory, or that fails as
    it does without a network."""
    import huggingface_hub

    asked = []

    def serve(repo_id, allow_patterns):
        asked.append((repo_id, allow_patterns))
        return str(llama_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", serve)
    convert.import_checkpoint("org/tiny-llama", str(tmp_path / "from_hub"))
    convert.import_checkpoint(str(llama_dir), str(tmp_path / "from_directory"))
    assert asked == [("org/tiny-llama", convert.HUB_FILES)]
    from_hub, from_directory = (checkpoint.restore(str(tmp_path / name)) for name in ("from_hub", "from_directory"))
    assert from_hub.config.model.to_dict() == from_directory.config.model.to_dict()
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 from_hub.params, from_directory.params)

    def offline(repo_id, allow_patterns):
        raise huggingface_hub.errors.LocalEntryNotFoundError("cannot reach huggingface.co and no cached copy")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(lm_errors.ConfigError, match="could not be downloaded from the Hugging Face hub "
                                                    r"\(LocalEntryNotFoundError: cannot reach"):
        convert.import_checkpoint("org/tiny-llama", str(tmp_path / "offline"))
    assert not (tmp_path / "offline").exists()


def import_memory(directory, devices, *extra):
    """The JSON line of tests/hf_import_memory.py for `directory` on `devices` simulated devices."""
    script = os.path.join(REPO, "tests", "hf_import_memory.py")
    result = subprocess.run([sys.executable, script, str(directory), *extra],
                            env=environment(devices), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("devices,zero3", [(1, False), (8, True)], ids=["one device", "8 devices, ZeRO-3"])
def test_import_holds_under_two_of_the_largest_tensor_beyond_the_model(devices, zero3, tmp_path_factory):
    """A 530 MB synthetic Llama checkpoint (fp32; the largest tensors, embedding and head, 131 MB). What the import
    holds beyond the model it builds is the peak resident memory less the memory before and the model's bytes, less
    the same measured for a tiny checkpoint (the fixed cost of the runtime compiling the placement)."""
    root = tmp_path_factory.getbasetemp() / "import_memory"
    big, tiny = root / "big", root / "tiny"
    if not big.exists():
        import_memory(big, 1, "--make")
        import_memory(tiny, 1, "--make", "--d_model=128", "--vocab=1000")
    flag = ["--zero3"] if zero3 else []
    measured, fixed = import_memory(big, devices, *flag), import_memory(tiny, devices, *flag)
    assert measured["model_bytes"] >= 500e6 * (1 if zero3 else devices)
    held = measured["extra_bytes"] - fixed["extra_bytes"]
    assert held <= 2 * measured["largest_tensor_bytes"], (held, measured, fixed)
