"""lm.data: sources, tokenizer, packing, per-process shards, resumable iterators, errors.

Every dataset here is written by the tests (or is the default corpus, which every Python installation carries);
nothing is downloaded. One SentencePiece model is trained per session (on the default corpus, ~1 s) and shared.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lm import config as lm_config
from lm import sharding
from lm.data import packing, pipeline, sources, text_files, tokenizer_training
from lm.data import tokenizer as tokenizer_lib
from lm.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_LEN = 32
BATCH = 8



def document_ids(tokenizer, text):
    """A document as the pipeline tokenizes it: `[BOS] + ids + [EOS]`."""
    return [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]


def _config(cache_dir, **data):
    c = lm_config.base_config()
    c.data.cache_dir = str(cache_dir)
    c.data.seq_len = SEQ_LEN
    c.data.batch_size = BATCH
    for key, value in data.items():
        c.data[key] = value
    return c


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("lm_cache")


@pytest.fixture(scope="session")
def tokenizer(cache_dir):
    """The default tokenizer (BPE, 2048 pieces) trained once on the default corpus."""
    config = _config(cache_dir)
    return tokenizer_training.get_or_train(config, sources.resolve(config, "train"))


def _words(rng, n):
    vocab = ["the", "model", "reads", "packed", "windows", "of", "text", "and", "ünïcödé", "日本語", "tabs\t",
             "(x)", "42", "  indented", "\n", "end."]
    return " ".join(rng.choice(vocab, size=n))


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory):
    """Three .txt files (one much longer than a window) and a .jsonl of 80 short documents, some empty."""
    root = tmp_path_factory.mktemp("texts")
    rng = np.random.default_rng(0)
    (root / "sub").mkdir()
    (root / "a.txt").write_text("A short file.\n")
    (root / "b.txt").write_text(_words(rng, 400) + "\n\nSecond paragraph.\n")
    (root / "sub" / "c.txt").write_text(_words(rng, 30))
    with open(root / "docs.jsonl", "w") as f:
        for i in range(80):
            text = "" if i % 17 == 5 else _words(rng, int(rng.integers(1, 40)))
            f.write(json.dumps({"text": text, "id": i}) + "\n")
    return root


@pytest.fixture(scope="session")
def files_config(cache_dir, text_dir):
    return _config(cache_dir, source="files", files=f"{text_dir}/**/*.txt,{text_dir}/*.jsonl")


def _all_documents(config, split):
    return list(sources.iter_texts(sources.resolve(config, split)))


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _stream_documents(batches, tokenizer):
    """Rebuilds documents from packed batches: concatenated windows, padding stripped, cut after each EOS."""
    windows = [np.append(b["inputs"][r], b["targets"][r, -1]) for b in batches for r in range(len(b["inputs"]))]
    stream = np.concatenate(windows)
    stream = np.trim_zeros(stream, "b")  # Padding (pad_id 0) only ever ends a finite stream.
    ends = np.flatnonzero(stream == tokenizer.eos_id)
    assert ends[-1] == len(stream) - 1, "the stream ends with an EOS"
    docs = []
    for piece in np.split(stream, ends[:-1] + 1):
        assert piece[0] == tokenizer.bos_id and piece[-1] == tokenizer.eos_id
        docs.append(tokenizer.decode(piece[1:-1].tolist()))
    return docs


# ------------------------------------------------------------------------------------------------------------------
# Packing.


def test_window_to_example_marks_every_document_boundary():
    bos, eos, pad = 1, 2, 0
    # Window of 10 = seq_len 9 + 1: the end of a document continued from the last window, a whole document, the
    # start of another, then (end of a finite stream) padding.
    tokens_w = np.array([7, eos, bos, 8, 9, eos, bos, 5, pad, pad], np.int32)
    segment_ids_w = np.array([1, 1, 2, 2, 2, 2, 3, 3, 0, 0], np.int32)
    positions_w = np.array([0, 1, 0, 1, 2, 3, 0, 1, 0, 0], np.int32)
    ex = packing.window_to_example(tokens_w, segment_ids_w, positions_w)
    np.testing.assert_array_equal(ex["inputs"], [7, eos, bos, 8, 9, eos, bos, 5, pad])
    np.testing.assert_array_equal(ex["targets"], [eos, bos, 8, 9, eos, bos, 5, pad, pad])
    np.testing.assert_array_equal(ex["segment_ids"], [1, 1, 2, 2, 2, 2, 3, 3, 0])
    np.testing.assert_array_equal(ex["positions"], [0, 1, 0, 1, 2, 3, 0, 1, 0])
    # No target across a boundary (EOS -> next BOS), none from or to padding; EOS itself is a target.
    np.testing.assert_array_equal(ex["weights"], [1, 0, 1, 1, 1, 0, 1, 0, 0])
    assert {k: v.dtype for k, v in ex.items()} == {
        "inputs": np.int32, "targets": np.int32, "segment_ids": np.int32, "positions": np.int32,
        "weights": np.float32}


def test_packer_state_restores_exactly_after_every_batch_through_json():
    """grain's packer keeps tuples in its state that JSON turns into lists; restore_state_types undoes that."""
    import grain

    lengths = [5, 3, 8, 4, 4, 1, 9, 7, 2, 6] * 4  # Windows of 8 often end exactly at a document boundary.
    docs = [{"tokens": np.arange(n, dtype=np.int32) + 10 * i} for i, n in enumerate(lengths)]

    def make():
        return iter(packing.pack(grain.MapDataset.source(docs).to_iter_dataset(), seq_len=7).batch(2))

    reference = list(make())
    for k in range(len(reference)):
        it = make()
        _take(it, k)
        resumed = make()
        resumed.set_state(packing.restore_state_types(json.loads(json.dumps(it.get_state()))))
        _assert_batches_equal(list(resumed), reference[k:])


def test_packed_windows_reassemble_the_documents(files_config, tokenizer):
    it = pipeline.make_train_iterator(files_config, tokenizer=tokenizer, shuffle=False, num_epochs=1,
                                      process_index=0, process_count=1)
    batches = list(it)
    expected = _all_documents(files_config, "train")
    assert _stream_documents(batches, tokenizer) == expected
    # Only the last batch has padding rows or padded positions.
    assert all(b["weights"].all(axis=1).sum() > 0 for b in batches)
    assert (np.concatenate([b["segment_ids"] for b in batches[:-1]]) > 0).all()


def test_segment_ids_positions_and_weights_are_right_at_every_boundary(files_config, tokenizer):
    it = pipeline.make_train_iterator(files_config, tokenizer=tokenizer, shuffle=True, process_index=0,
                                      process_count=1)
    bos = tokenizer.bos_id
    boundaries = 0
    for batch in _take(it, 30):
        assert {k: v.shape for k, v in batch.items()} == {k: (BATCH, SEQ_LEN) for k in packing.FEATURES}
        for inputs, targets, seg, pos, w in zip(*(batch[k] for k in packing.FEATURES)):
            # A new segment starts at every BOS after the first token; the row starts with segment 1.
            starts = (inputs == bos) & (np.arange(SEQ_LEN) > 0)
            np.testing.assert_array_equal(seg, 1 + np.cumsum(starts))
            start_of_segment = np.maximum.accumulate(np.where(starts | (np.arange(SEQ_LEN) == 0),
                                                              np.arange(SEQ_LEN), 0))
            np.testing.assert_array_equal(pos, np.arange(SEQ_LEN) - start_of_segment)
            np.testing.assert_array_equal(w, (targets != bos).astype(np.float32))
            boundaries += int(starts.sum())
    assert boundaries > 50


def _segments(batches):
    """Every segment of every row, as the tokens it holds, in row order: its inputs, then its last target when that
    is in the segment (a segment that ends the row's window has its last token only as a target)."""
    segments = []
    for batch in batches:
        for inputs, targets, seg, weights in zip(batch["inputs"], batch["targets"], batch["segment_ids"],
                                                 batch["weights"]):
            for s in np.unique(seg[seg > 0]):
                where = np.flatnonzero(seg == s)
                last = targets[where[-1]:where[-1] + 1] if weights[where[-1]] else []
                segments.append(np.append(inputs[where], last))
    return segments


def test_document_windows_make_every_token_but_the_first_a_target_once():
    for n in (2, 3, 8, 9, 10, 17, 30):
        tokens = np.arange(100, 100 + n)
        windows = packing.document_windows(tokens, seq_len=8)
        assert all(2 <= len(w) <= 9 for w in windows)
        np.testing.assert_array_equal(np.concatenate([w[1:] for w in windows]), tokens[1:])
        assert all(w[0] == previous[-1] for previous, w in zip(windows, windows[1:]))


def test_pad_layout_puts_one_window_of_one_document_per_row_and_masks_padding(files_config, tokenizer):
    it = pipeline.make_train_iterator(files_config, tokenizer=tokenizer, shuffle=False, layout="pad", num_epochs=1,
                                      process_index=0, process_count=1)
    batches = list(it)
    rows = {k: np.concatenate([b[k] for b in batches]) for k in packing.FEATURES}
    seg, w = rows["segment_ids"], rows["weights"]
    assert set(np.unique(seg)) <= {0, 1}, "at most one document per row"
    assert (w[seg == 0] == 0).all() and (rows["inputs"][seg == 0] == 0).all()
    assert ((seg == 0).sum(axis=1) > 0).any(), "some rows are padded"
    real = seg.sum(axis=1) > 0
    # Rows hold a prefix of real tokens; positions count them.
    np.testing.assert_array_equal(rows["positions"][real], np.where(seg[real] == 1, np.arange(SEQ_LEN), 0))
    # Every document of the split appears, in order, cut into its windows.
    expected = [window for text in _all_documents(files_config, "train")
                for window in packing.document_windows(
                    np.asarray(document_ids(tokenizer, text)), SEQ_LEN)]
    observed = _segments(batches)
    assert len(observed) == len(expected)
    for window, segment in zip(expected, observed):
        np.testing.assert_array_equal(segment, window)


def test_eval_layout_packs_whole_windows_so_every_target_counts_once(files_config, tokenizer):
    import collections

    batches = list(pipeline.make_eval_iterator(files_config, tokenizer=tokenizer, process_index=0, process_count=1))
    token_docs = [np.asarray(document_ids(tokenizer, text))
                  for text in _all_documents(files_config, "validation")]
    expected = collections.Counter(tuple(window.tolist()) for tokens in token_docs
                                   for window in packing.document_windows(tokens, SEQ_LEN))
    observed = collections.Counter(tuple(segment.tolist()) for segment in _segments(batches))
    assert observed == expected, "each window whole, in one segment, exactly once"
    assert sum(b["weights"].sum() for b in batches) == sum(len(tokens) - 1 for tokens in token_docs)
    assert max(int(b["segment_ids"].max()) for b in batches) > 1, "short windows share rows"
    # Positions restart in every segment; padding rows fill up only the last batch.
    for batch in batches:
        for seg, pos in zip(batch["segment_ids"], batch["positions"]):
            for s in np.unique(seg[seg > 0]):
                np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))
    assert all((b["segment_ids"].max(axis=1) > 0).all() for b in batches[:-1])


# ------------------------------------------------------------------------------------------------------------------
# Sources.


def test_tfds_builder_over_local_files_works_end_to_end_offline(files_config, text_dir, tokenizer):
    train = sources.resolve(files_config, "train")
    validation = sources.resolve(files_config, "validation")
    assert train.random_access and train.fingerprint.startswith("lm_text_files/")
    # 3 text files (one document each) + 80 JSON lines, each in exactly one split, by the hash of its key.
    keys = ["a.txt", "b.txt", "sub/c.txt"] + [f"docs.jsonl:{i}" for i in range(1, 81)]
    n_validation = sum(text_files.is_validation(k, text_files.FILES_VALIDATION_PERCENT) for k in keys)
    assert (train.num_documents, validation.num_documents) == (83 - n_validation, n_validation)
    written = {(text_dir / "a.txt").read_text(), (text_dir / "sub" / "c.txt").read_text()}
    written |= {json.loads(line)["text"] for line in (text_dir / "docs.jsonl").read_text().splitlines()}
    read = set(_all_documents(files_config, "train")) | set(_all_documents(files_config, "validation"))
    assert written <= read and len(read - written) == 1  # + b.txt
    # TFDS split slicing works on the builder, e.g. an evaluation subset.
    assert sources.resolve(files_config, "train[:10]").num_documents == 10
    batch = next(pipeline.make_train_iterator(files_config, tokenizer=tokenizer, process_index=0, process_count=1))
    assert batch["inputs"].shape == (BATCH, SEQ_LEN)


def test_default_corpus_is_the_standard_library_with_a_fixed_split(cache_dir):
    spec = text_files.default_corpus_spec()
    names = [os.path.basename(f) for f in spec.files]
    assert names == sorted(names) and {"os.py", "argparse.py", "typing.py"} <= set(names)
    assert all(n[:-3] in sys.stdlib_module_names for n in names)
    config = _config(cache_dir)
    train, validation = sources.resolve(config, "train"), sources.resolve(config, "validation")
    assert train.num_documents + validation.num_documents == len(names)
    validation_names = [n for n in names if text_files.is_validation(n, text_files.DEFAULT_CORPUS_VALIDATION_PERCENT)]
    assert validation.num_documents == len(validation_names) > 0
    texts = set(_all_documents(config, "validation"))
    assert texts == {open(os.path.join(spec.root, n), encoding="utf-8", newline="").read() for n in validation_names}


def test_default_corpus_and_synthetic_work_without_tensorflow(tmp_path):
    """The GPU image has no TensorFlow: the default corpus (TFDS ArrayRecord) and synthetic data still load."""
    script = f"""
import importlib.machinery, sys
class NoTensorFlow(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)
sys.meta_path = [NoTensorFlow if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
from lm import config
from lm.data import pipeline, sources, tokenizer_training
c = config.base_config()
c.data.cache_dir = {str(tmp_path)!r}
for source in ("synthetic", "default"):
    c.data.source = source
    split = sources.resolve(c, "train") if source == "default" else None
    tokenizer = split and tokenizer_training.get_or_train(c, split)
    batch = next(pipeline.make_train_iterator(c, tokenizer=tokenizer, process_index=0, process_count=1))
    assert batch["inputs"].shape == (c.data.batch_size, c.data.seq_len), batch["inputs"].shape
assert "tensorflow" not in sys.modules
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_synthetic_global_batches_are_a_function_of_seed_and_step_only(cache_dir):
    config = _config(cache_dir, source="synthetic")
    a = _take(pipeline.make_train_iterator(config, tokenizer=None, process_index=0, process_count=2), 3)
    b = _take(pipeline.make_train_iterator(config, tokenizer=None, process_index=0, process_count=2), 3)
    other = _take(pipeline.make_train_iterator(config, tokenizer=None, process_index=1, process_count=2), 3)
    single = _take(pipeline.make_train_iterator(config, tokenizer=None, process_index=0, process_count=1), 3)
    _assert_batches_equal(a, b)
    assert a[0]["inputs"].shape == (BATCH // 2, SEQ_LEN)
    assert not np.array_equal(a[0]["inputs"], other[0]["inputs"])
    for step in range(3):  # Two processes' rows, stacked in process order, are the one-process global batch.
        np.testing.assert_array_equal(np.concatenate([a[step]["inputs"], other[step]["inputs"]]),
                                      single[step]["inputs"])
    assert (a[0]["inputs"] < config.model.vocab_size).all() and (a[0]["weights"] == 1).all()
    np.testing.assert_array_equal(a[0]["inputs"][:, 1:], a[0]["targets"][:, :-1])


# ------------------------------------------------------------------------------------------------------------------
# Shards across processes.


def test_two_processes_read_disjoint_shards_that_cover_the_data(files_config, tokenizer):
    resolved = sources.resolve(files_config, "train")
    shards = [list(sources.documents(resolved, process_index=p, process_count=2, shuffle=False, num_epochs=1))
              for p in range(2)]
    assert abs(len(shards[0]) - len(shards[1])) <= 1
    assert sorted(shards[0] + shards[1]) == sorted(_all_documents(files_config, "train"))
    # The same through the batch pipeline: each process packs only its documents, half of the global batch.
    per_process = []
    for p in range(2):
        it = pipeline.make_train_iterator(files_config, tokenizer=tokenizer, shuffle=False, num_epochs=1,
                                          process_index=p, process_count=2)
        batches = list(it)
        assert batches[0]["inputs"].shape == (BATCH // 2, SEQ_LEN)
        per_process.append(_stream_documents(batches, tokenizer))
    assert per_process == [shards[0], shards[1]]


def test_to_global_arrays_builds_the_global_batch_on_a_mesh(cache_dir):
    import jax

    config = _config(cache_dir, source="synthetic")
    mesh = jax.make_mesh((2, 4, 1, 1), sharding.MESH_AXES)
    local = next(pipeline.make_train_iterator(config, tokenizer=None))
    arrays = pipeline.to_global_arrays(local, sharding.batch_sharding(config, mesh))
    for k, v in arrays.items():
        assert v.shape == (BATCH, SEQ_LEN) and v.dtype == local[k].dtype
        assert len(v.addressable_shards) == 8 and v.addressable_shards[0].data.shape == (1, SEQ_LEN)
        np.testing.assert_array_equal(np.asarray(v), local[k])


@pytest.mark.slow
def test_two_real_processes_assemble_one_global_batch(tmp_path, tokenizer):
    """Two jax.distributed processes (4 CPU devices each): each feeds its shard; the global array holds both."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model_path = tmp_path / "tokenizer.model"
    model_path.write_bytes(tokenizer.processor.serialized_model_proto())
    script = f"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize("127.0.0.1:{port}", num_processes=2, process_id=int(sys.argv[1]),
                           initialization_timeout=60)
from jax.experimental import multihost_utils
from lm import config, sharding
from lm.data import pipeline, tokenizer
c = config.base_config()
c.data.cache_dir = {str(tmp_path)!r}
c.data.seq_len, c.data.batch_size = {SEQ_LEN}, 16
it = pipeline.make_train_iterator(c, tokenizer=tokenizer.load({str(model_path)!r}))
assert it.local_batch_size == 8
mesh = jax.make_mesh((2, 4, 1, 1), sharding.MESH_AXES)
for _ in range(3):
    local = next(it)
    arrays = pipeline.to_global_arrays(local, sharding.batch_sharding(c, mesh))
    full = multihost_utils.process_allgather(arrays["inputs"], tiled=True)
    assert full.shape == (16, {SEQ_LEN}), full.shape
    p = jax.process_index()
    np.testing.assert_array_equal(full[8 * p: 8 * (p + 1)], local["inputs"])
    assert not np.array_equal(full[:8], full[8:])
it.close()
print("ok", jax.process_index())
"""
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    report = "\n".join(f"process {i}: rc={p.returncode}\n{err[-2000:]}" for i, (p, (_, err)) in
                       enumerate(zip(procs, outs)))
    for i, (p, (out, _)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"ok {i}" in out, report


# ------------------------------------------------------------------------------------------------------------------
# Determinism and resume.


@pytest.mark.parametrize("source,pack,prefetch", [
    ("default", True, 2),
    ("default", False, 0),
    ("files", True, 2),  # Short documents: the packer's state often has no remainder.
    ("synthetic", True, 2),
])
def test_restored_iterator_continues_exactly_like_an_uninterrupted_one(cache_dir, text_dir, tokenizer, source, pack,
                                                                      prefetch):
    config = _config(cache_dir, source=source, files=f"{text_dir}/**/*.txt,{text_dir}/*.jsonl", pack=pack)
    tok = None if source == "synthetic" else tokenizer

    def make():
        return pipeline.make_train_iterator(config, tokenizer=tok, prefetch=prefetch, process_index=0,
                                            process_count=1)

    uninterrupted = make()
    reference = _take(uninterrupted, 40)
    for k in (1, 7, 23):
        first = make()
        _take(first, k)
        state = json.loads(json.dumps(first.get_state()))  # Through JSON, as a checkpoint stores it.
        assert state["step"] == k
        resumed = make()
        resumed.set_state(state)
        _assert_batches_equal(_take(resumed, 40 - k), reference[k:])
        assert resumed.step == 40


def test_iterator_state_is_saved_and_restored_with_an_orbax_checkpoint(tmp_path, files_config, tokenizer):
    """The trainer's path: grain's orbax handler writes one JSON state per process beside the model state."""
    import grain
    import orbax.checkpoint as ocp

    def make():
        return pipeline.make_train_iterator(files_config, tokenizer=tokenizer, process_index=0, process_count=1)

    it = make()
    _take(it, 5)
    with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
        manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    expected = _take(it, 10)
    resumed = make()
    with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
        manager.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    assert resumed.step == 5
    _assert_batches_equal(_take(resumed, 10), expected)
    assert (tmp_path / "checkpoints" / "5" / "data" / "process_0-of-1.json").exists()


def test_same_seed_same_stream_other_seed_other_order(files_config, tokenizer):
    def first_batches(seed):
        c = files_config.copy_and_resolve_references()
        c.seed = seed
        return _take(pipeline.make_train_iterator(c, tokenizer=tokenizer, process_index=0, process_count=1), 5)

    _assert_batches_equal(first_batches(0), first_batches(0))
    assert not np.array_equal(first_batches(0)[0]["inputs"], first_batches(1)[0]["inputs"])


def test_restoring_a_state_saved_under_another_config_is_an_error(files_config, tokenizer):
    it = pipeline.make_train_iterator(files_config, tokenizer=tokenizer, process_index=0, process_count=1)
    next(it)
    state = it.get_state()
    other = pipeline.make_train_iterator(files_config, tokenizer=tokenizer, process_index=0, process_count=2)
    with pytest.raises(pipeline.IteratorStateError, match="process_count=1"):
        other.set_state(state)


# ------------------------------------------------------------------------------------------------------------------
# TFDS datasets by name (a registered builder prepared into a temporary data_dir, in both storage formats).


def _tiny_tfds_builder_class():
    import tensorflow_datasets as tfds
    from etils import epath

    name = "lm_test_tiny_text"
    if name in tfds.list_builders():
        return tfds.builder_cls(name)

    class LmTestTinyText(tfds.core.GeneratorBasedBuilder):
        """120 short documents in `train`, 10 in `test`, the text in field `sentence`."""

        VERSION = tfds.core.Version("1.0.0")

        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls):
            return epath.Path(__file__)

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"sentence": tfds.features.Text(), "label": tfds.features.Scalar(np.int64)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(0, 120), "test": self._generate_examples(1000, 10)}

        def _generate_examples(self, start, n):
            for i in range(start, start + n):
                yield i, {"sentence": f"Sentence number {i} " + "word " * (i % 23), "label": i}

    return LmTestTinyText


@pytest.fixture(scope="session", params=["tfrecord", "array_record"])
def tfds_config(request, tmp_path_factory, cache_dir):
    data_dir = tmp_path_factory.mktemp(f"tfds_{request.param}")
    _tiny_tfds_builder_class()(data_dir=str(data_dir), file_format=request.param).download_and_prepare()
    return _config(cache_dir, source="tfds", name="lm_test_tiny_text", data_dir=str(data_dir),
                   text_field="sentence", eval_split="test")


def test_tfds_dataset_by_name_reads_shards_and_resumes(tfds_config, tokenizer):
    resolved = sources.resolve(tfds_config, "train")
    assert resolved.num_documents == 120
    assert resolved.random_access == (tfds_config.data.data_dir.split("/")[-1].startswith("tfds_array_record"))
    everything = sorted(f"Sentence number {i} " + "word " * (i % 23) for i in range(120))
    shards = [list(sources.documents(resolved, process_index=p, process_count=3, shuffle=False, num_epochs=1))
              for p in range(3)]
    assert sorted(sum(shards, [])) == everything and all(len(s) == 40 for s in shards)

    def make():
        return pipeline.make_train_iterator(tfds_config, tokenizer=tokenizer, process_index=1, process_count=2)

    reference = _take(make(), 30)  # Several epochs of this process's 60 documents.
    first = make()
    _take(first, 11)
    resumed = make()
    resumed.set_state(json.loads(json.dumps(first.get_state())))
    _assert_batches_equal(_take(resumed, 19), reference[11:])
    eval_batch = next(pipeline.make_eval_iterator(tfds_config, tokenizer=tokenizer, process_index=0,
                                                  process_count=1))
    assert tokenizer.decode(eval_batch["inputs"][0].tolist()).startswith("Sentence number 100")  # A test document.


# ------------------------------------------------------------------------------------------------------------------
# Tokenizer.


def test_tokenizer_trained_on_the_default_corpus_is_lossless(cache_dir, tokenizer):
    config = _config(cache_dir)
    assert tokenizer.vocab_size == config.data.tokenizer.vocab_size == 2048
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.processor.unk_id()) == (0, 1, 2, 3)
    texts = _all_documents(config, "train") + _all_documents(config, "validation")
    assert len(texts) == len(text_files.default_corpus_spec().files)
    assert [tokenizer.decode(tokenizer.encode(text)) for text in texts] == texts
    # Byte fallback: text the corpus never showed still round-trips.
    odd = "Ωμέγα ☃ 🙂\r\n\ttab  two  spaces\x0c"
    assert tokenizer.decode(tokenizer.encode(odd)) == odd
    assert tokenizer.processor.unk_id() not in {i for text in [*texts, odd] for i in tokenizer.encode(text)}


def test_tokenizer_is_cached_and_kept_in_the_workdir(cache_dir, tokenizer, tmp_path):
    config = _config(cache_dir)
    train_split = sources.resolve(config, "train")
    path = tokenizer_training.cached_path(config, train_split)
    mtime = os.stat(path).st_mtime_ns
    in_workdir = tokenizer_training.get_or_train(config, train_split, workdir=str(tmp_path))
    assert os.stat(path).st_mtime_ns == mtime, "not trained again"
    assert (tmp_path / "tokenizer.model").read_bytes() == tokenizer.processor.serialized_model_proto()
    assert in_workdir.fingerprint() == tokenizer.fingerprint()
    # A resumed run uses the workdir's model even if the config now names another file.
    config.data.tokenizer.path = str(tmp_path / "missing.model")
    assert tokenizer_training.get_or_train(config, train_split, workdir=str(tmp_path)).fingerprint() \
        == tokenizer.fingerprint()
    # Evaluation and sampling load the workdir's copy and nothing else.
    assert tokenizer_lib.from_workdir(str(tmp_path)).fingerprint() == tokenizer.fingerprint()
    with pytest.raises(lm_config.CheckpointError, match="tokenizer.model does not exist"):
        tokenizer_lib.from_workdir(str(tmp_path / "elsewhere"))


def test_tokenizer_cli_trains_on_the_configured_source(tmp_path, text_dir):
    output = tmp_path / "files.model"
    out = subprocess.run(
        [sys.executable, "-m", "lm.data.tokenizer_training", "--config=configs/tiny.py", f"--output={output}",
         "--config.data.source=files", f"--config.data.files={text_dir}/*.jsonl",
         "--config.data.tokenizer.vocab_size=300", "--config.model.vocab_size=384",
         f"--config.data.cache_dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "300 pieces" in out.stdout
    model = tokenizer_lib.load(str(output))
    assert model.vocab_size == 300
    text = "the model reads ünïcödé 日本語"
    assert model.decode(model.encode(text)) == text


def test_padded_vocab_size_rounds_up_to_multiples_of_128():
    assert [tokenizer_lib.padded_vocab_size(n) for n in (1, 128, 129, 2048, 32000, 50257)] == \
        [128, 128, 256, 2048, 32000, 50304]


# ------------------------------------------------------------------------------------------------------------------
# Errors name what is wrong.


def test_unknown_tfds_name_is_an_error(cache_dir):
    config = _config(cache_dir, source="tfds", name="no_such_dataset_xyz")
    with pytest.raises(sources.DatasetNotFoundError, match="config.data.name='no_such_dataset_xyz'"):
        pipeline.make_train_iterator(config, tokenizer=None, process_index=0, process_count=1)


def test_tfds_dataset_not_prepared_in_data_dir_is_an_error(cache_dir, tmp_path):
    _tiny_tfds_builder_class()
    config = _config(cache_dir, source="tfds", name="lm_test_tiny_text", data_dir=str(tmp_path))
    with pytest.raises(sources.DatasetNotFoundError, match="not prepared in data_dir=.*tfds build"):
        sources.resolve(config, "train")


def test_unknown_split_is_an_error(files_config):
    with pytest.raises(sources.SplitNotFoundError, match="split 'tset'.*'train', 'validation'"):
        sources.resolve(files_config, "tset")


def test_tfds_text_field_missing_is_an_error(tfds_config):
    config = tfds_config.copy_and_resolve_references()
    config.data.text_field = "text"
    with pytest.raises(sources.TextFieldError, match=r"config.data.text_field='text'.*\['label', 'sentence'\]"):
        sources.resolve(config, "train")


def test_json_lines_without_the_text_field_are_an_error(cache_dir, tmp_path):
    (tmp_path / "x.jsonl").write_text('{"body": "hello"}\n')
    config = _config(cache_dir, source="files", files=str(tmp_path / "*.jsonl"), data_dir=str(tmp_path / "tfds"))
    with pytest.raises(sources.TextFieldError, match=r"x.jsonl:1: no text field 'text'.*\['body'\]"):
        sources.resolve(config, "train")


def test_missing_files_are_an_error(cache_dir, tmp_path):
    config = _config(cache_dir, source="files", files=str(tmp_path / "nothing" / "*.txt"))
    with pytest.raises(sources.FilesNotFoundError, match="config.data.files=.*nothing.*matches no files"):
        pipeline.make_train_iterator(config, tokenizer=None, process_index=0, process_count=1)


def test_empty_dataset_is_an_error(cache_dir, tmp_path):
    # One text file is one document: it lands in `train`, and `validation` is empty.
    name = next(f"only{i}.txt" for i in range(100) if not text_files.is_validation(f"only{i}.txt", 5))
    (tmp_path / name).write_text("A single document.")
    config = _config(cache_dir, source="files", files=str(tmp_path / "*.txt"), data_dir=str(tmp_path / "tfds"))
    assert sources.resolve(config, "train").num_documents == 1
    with pytest.raises(sources.EmptyDatasetError, match="split 'validation' of files .*txt has no documents"):
        pipeline.make_eval_iterator(config, tokenizer=None, process_index=0, process_count=1)
    # Files without any document.
    (tmp_path / "empty.jsonl").write_text("\n\n")
    config.data.files = str(tmp_path / "*.jsonl")
    with pytest.raises(sources.EmptyDatasetError, match="1 files under .* hold no documents"):
        sources.resolve(config, "train")


def test_fewer_documents_than_processes_is_an_error(files_config, tokenizer):
    config = files_config.copy_and_resolve_references()
    config.data.batch_size = 64
    with pytest.raises(sources.EmptyDatasetError, match="none for process 9 of 32"):
        pipeline.make_iterator(config, "train[:3]", tokenizer=tokenizer, process_index=9, process_count=32)


def test_tokenizer_larger_than_the_model_vocabulary_is_an_error(files_config, tokenizer):
    config = files_config.copy_and_resolve_references()
    config.model.vocab_size = 1024
    with pytest.raises(ConfigError, match="2048 pieces but config.model.vocab_size=1024.*2048"):
        pipeline.make_train_iterator(config, tokenizer=tokenizer, process_index=0, process_count=1)


def test_seq_len_longer_than_max_seq_len_is_an_error(cache_dir):
    config = _config(cache_dir, source="synthetic")
    config.data.seq_len = config.model.max_seq_len + 1
    with pytest.raises(ConfigError, match="config.data.seq_len=257 is longer than config.model.max_seq_len=256"):
        pipeline.make_train_iterator(config, tokenizer=None)


def test_batch_size_not_divisible_by_processes_is_an_error(cache_dir):
    config = _config(cache_dir, source="synthetic")
    with pytest.raises(ConfigError, match="config.data.batch_size=8 .* not divisible by the 3 processes"):
        pipeline.make_train_iterator(config, tokenizer=None, process_index=0, process_count=3)
