"""Safetensors weights in and out of lm's sharded parameters, a slice at a time.

Import (`load_params`): every parameter is built with `jax.make_array_from_callback`, so each process reads, for
each of its devices, only the rows of the Hugging Face tensor that cover the slice that device holds
(`SafetensorsReader.read`, one read into one buffer, nothing memory-mapped). A parameter stacked over layers
(`scan_layers`) is filled one layer at a time into its donated buffer, so the host never holds more than about one
tensor beyond the model itself (`tests/test_hf.py` measures it). A stack of experts (`TensorMap.experts`) is read
from one tensor per expert, each device reading only its own experts'; a permuted axis (`TensorMap.order`,
DeepSeek-V3's rotary pairs: one head wide) is read whole.

Export (`save_params`): process 0 writes `model.safetensors`, or `model-0000i-of-0000n.safetensors` shards with
`model.safetensors.index.json` when the tensors exceed `max_shard_bytes`, one Hugging Face tensor gathered at a
time.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Callable

import jax
from jax.experimental import multihost_utils
import ml_dtypes
import numpy as np

from lm import model as model_lib
from lm.errors import CheckpointError
import lm.hf.architectures as architectures
from lm.hf.architectures import TensorMap

SINGLE_FILE = "model.safetensors"
READ_BLOCK_BYTES = 16 * 2**20  # The most read at once for a partial slice.
INDEX_FILE = "model.safetensors.index.json"


def _on_host():
    """Arrays handed to safetensors' writer stay on the host CPU, whatever the default backend."""
    return jax.default_device(jax.local_devices(backend="cpu")[0])


# safetensors dtype names -> numpy dtypes (bfloat16 through ml_dtypes, which JAX ships).
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class SafetensorsReader:
    """The tensors of a Hugging Face model directory: one `model.safetensors`, or the shards its index names.
    `hf_config` is the directory's `config.json` (`{}` without one), for the layout options of its tensors that lm's
    config does not carry (`architectures.tensors`).

    Reads the safetensors layout directly (an 8-byte header length, a JSON header of dtype, shape and byte offsets
    per tensor, then the row-major data): a slice is one read of the rows it covers, into one buffer. The
    `safetensors` package's readers cannot slice bfloat16 into numpy, and copy more than once on the way.
    """

    def __init__(self, directory: str):
        self.directory = directory
        index_path = os.path.join(directory, INDEX_FILE)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.isfile(os.path.join(directory, SINGLE_FILE)):
            files = [SINGLE_FILE]
        else:
            raise CheckpointError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE} (only safetensors weights "
                                  f"are read)")
        self.hf_config: dict[str, Any] = {}
        if os.path.isfile(os.path.join(directory, "config.json")):
            with open(os.path.join(directory, "config.json")) as f:
                self.hf_config = json.load(f)
        # name -> (file path, numpy dtype, shape, first byte of its data in the file)
        self._tensors: dict[str, tuple[str, np.dtype, tuple[int, ...], int]] = {}
        for file in files:
            path = os.path.join(directory, file)
            try:
                with open(path, "rb") as f:
                    header_bytes = int.from_bytes(f.read(8), "little")
                    header = json.loads(f.read(header_bytes))
            except (OSError, ValueError) as error:
                raise CheckpointError(f"{path} is not a readable safetensors file ({error})") from None
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                if entry["dtype"] not in _DTYPES:
                    raise CheckpointError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, which lm does not read")
                self._tensors[name] = (path, np.dtype(_DTYPES[entry["dtype"]]), tuple(entry["shape"]),
                                       8 + header_bytes + entry["data_offsets"][0])

    @property
    def files(self) -> dict[str, str]:
        """Tensor name -> the file holding it."""
        return {name: path for name, (path, *_) in self._tensors.items()}

    def names(self) -> list[str]:
        return sorted(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensors[name][2]

    def dtype(self, name: str) -> np.dtype:
        return self._tensors[name][1]

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """`tensor[index]` (a slice per axis), contiguous, in the stored dtype. Whole rows are read straight into
        the result; when only part of each row is wanted, rows are read a block at a time (at most
        `READ_BLOCK_BYTES`), so nothing beyond the result and one block is held."""
        path, dtype, shape, start = self._tensors[name]
        rows = range(*index[0].indices(shape[0]))
        inner = tuple(index[1:]) + (slice(None),) * (len(shape) - len(index))
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        whole_rows = all(s.indices(d) == (0, d, 1) for s, d in zip(inner, shape[1:]))
        step = len(rows) if whole_rows else max(1, READ_BLOCK_BYTES // max(row_bytes, 1))
        out = None
        with open(path, "rb") as f:
            for first in range(0, len(rows), step):
                block = np.empty((min(step, len(rows) - first), *shape[1:]), dtype)
                f.seek(start + (rows.start + first) * row_bytes)
                if f.readinto(memoryview(block.reshape(-1).view(np.uint8))) != block.nbytes:
                    raise CheckpointError(f"{path}: tensor {name!r} is cut short (the file is truncated)")
                if whole_rows:
                    return block
                part = block[(slice(None), *inner)]
                if out is None:
                    out = np.empty((len(rows), *part.shape[1:]), dtype)
                out[first:first + len(part)] = part
        return out

    def read_transposed(self, name: str, rows: slice, columns: slice) -> np.ndarray:
        """`tensor[rows, columns].T` of a 2-D tensor, contiguous, filled a block of rows at a time (at most
        `READ_BLOCK_BYTES` read at once), so no second whole copy exists."""
        _, dtype, shape, _ = self._tensors[name]
        rows_range = range(*rows.indices(shape[0]))
        out = np.empty((len(range(*columns.indices(shape[1]))), len(rows_range)), dtype)
        step = max(1, READ_BLOCK_BYTES // (shape[1] * dtype.itemsize))
        for first in range(0, len(rows_range), step):
            block = slice(rows_range.start + first, rows_range.start + min(first + step, len(rows_range)))
            out[:, first:first + step] = self.read(name, (block, columns)).T
        return out


def _flat_range(index: tuple[slice, ...], dims: tuple[int, ...]) -> tuple[int, int, Callable[[np.ndarray], np.ndarray]]:
    """For axes `dims` flattened into one (row-major), the `(start, stop)` covering `index` (whole inner axes), and
    the function that turns those flat elements (first axis of its argument) into exactly `index`."""
    first = range(*index[0].indices(dims[0]))
    inner = math.prod(dims[1:])
    start, stop = first.start * inner, first.stop * inner

    def unflatten(x):
        x = x.reshape(len(first), *dims[1:], *x.shape[1:])
        return x[(slice(None), *index[1:])]

    return start, stop, unflatten


def read_shard(reader: SafetensorsReader, tensor: TensorMap, layer: int | None, shape: tuple[int, ...],
               index: tuple[slice, ...], expert: int | None = None) -> np.ndarray:
    """`lm_parameter[index]` of one layer (per-layer parameters, without the layers axis), `shape` being the
    parameter's whole (per-layer) shape; reads only the rows and columns of the Hugging Face tensor that cover it
    (the whole of a permuted last axis, `TensorMap.order`, which is one head's width). `expert`: which of an
    `experts` parameter's tensors, once the experts are taken apart."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    if tensor.experts:  # One tensor per expert along the first axis, each read into its place.
        experts = range(*index[0].indices(shape[0]))
        each = dataclasses.replace(tensor, experts=False)
        out = None
        for i, e in enumerate(experts):
            part = read_shard(reader, each, layer, shape[1:], index[1:], expert=e)
            if out is None:
                out = np.empty((len(experts), *part.shape), part.dtype)
            out[i] = part
        return out
    if tensor.order is not None:
        whole = read_shard(reader, dataclasses.replace(tensor, order=None), layer, shape, (*index[:-1], slice(None)),
                           expert)
        return whole[..., np.asarray(tensor.order)[index[-1]]]
    name = tensor.hf_name.format(layer=layer, expert=expert)
    a_start, a_stop, a_unflatten = _flat_range(index[:tensor.split], shape[:tensor.split])
    offset = tensor.block[0] if tensor.block else 0
    if tensor.split == len(shape):  # 1-D: every axis from the one.
        return a_unflatten(reader.read(name, (slice(a_start + offset, a_stop + offset),)))
    b_start, b_stop, b_unflatten = _flat_range(index[tensor.split:], shape[tensor.split:])
    b = slice(b_start + offset, b_stop + offset)
    if tensor.transpose:
        m_ab = reader.read_transposed(name, b, slice(a_start, a_stop))
    else:
        m_ab = reader.read(name, (slice(a_start, a_stop), b))
    return _unflatten_last(a_unflatten(m_ab), b_unflatten, len(shape) - tensor.split)


def _unflatten_last(x: np.ndarray, unflatten, axes: int) -> np.ndarray:
    """`x` `[..., flat]` -> `[..., *axes]`, with `unflatten` (of `_flat_range`) applied to the flat last axis."""
    unflat = unflatten(np.moveaxis(x, -1, 0))  # [*new axes, ...]
    return np.moveaxis(unflat, list(range(axes)), list(range(unflat.ndim - axes, unflat.ndim)))


# ---------------------------------------------------------------------------------------------------------------
# Import.


def _lm_place(path, config) -> tuple[tuple[str, ...], bool, list[int | None]]:
    """(path relative to a block or the root, stacked over layers, the layer numbers it holds: a scanned stack's
    along its leading axis, an unscanned block's one, `[None]` at the root)."""
    keys = tuple(getattr(k, "key", k) for k in path)
    if config.model.scan_layers:
        for name, first, count, _ in model_lib.layer_stacks(config.model):
            if keys[0] == name:
                return keys[1:], True, list(range(first, first + count))
    if keys[0].startswith("layers_"):
        return keys[1:], False, [int(keys[0].removeprefix("layers_"))]
    return keys, False, [None]


def _expected_shape(tensor: TensorMap, shape: tuple[int, ...]) -> tuple[int, ...]:
    if tensor.experts:
        shape = shape[1:]
    a, b = math.prod(shape[:tensor.split]), math.prod(shape[tensor.split:])
    if tensor.split == len(shape):
        return (a,)
    return (b, a) if tensor.transpose else (a, b)


def _hf_names(tensor: TensorMap, layer: int | None, per_layer_shape: tuple[int, ...]) -> list[str]:
    """The Hugging Face tensors holding one layer of the parameter: one, or one per expert."""
    experts = range(per_layer_shape[0]) if tensor.experts else [None]
    return [tensor.hf_name.format(layer=layer, expert=e) for e in experts]


def check_tensors(reader: SafetensorsReader, config, abstract_params) -> None:
    """Every lm parameter has its tensor, of the shape `config` implies, and no weight goes unused; CheckpointError
    naming the first tensor that does not fit (before anything is read)."""
    maps = {t.lm_path: t for t in architectures.tensors(config, reader.hf_config)}
    expected: dict[str, tuple[int, ...]] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params):
        relative, stacked, layers = _lm_place(path, config)
        tensor = maps[relative]
        per_layer_shape = leaf.shape[1:] if stacked else leaf.shape
        shape = _expected_shape(tensor, per_layer_shape)
        for name in (name for i in layers for name in _hf_names(tensor, i, per_layer_shape)):
            if tensor.block:  # A block of a fused tensor: the fused width is checked once all blocks are known.
                shape = (*shape[:-1], max(tensor.block[1], expected.get(name, (0,))[-1]))
            expected[name] = shape
    missing = [name for name in expected if name not in reader.files]
    if missing:
        raise CheckpointError(f"{reader.directory}: the weights lack {missing[0]!r} ({len(missing)} tensors missing) "
                              f"for this config")
    unused = [name for name in reader.names()
              if name not in expected and not architectures.skipped(name, reader.hf_config)]
    if unused:
        raise CheckpointError(f"{reader.directory}: tensor {unused[0]!r} has no place in lm's model "
                              f"({len(unused)} unused); lm does not read this checkpoint's architecture options")
    for name, shape in expected.items():
        found = reader.shape(name)
        if found != shape:
            raise CheckpointError(f"{reader.directory}: tensor {name!r} has shape {list(found)}, expected "
                                  f"{list(shape)} from config.json")


def load_params(reader: SafetensorsReader, config, shardings) -> Any:
    """lm parameters (a tree of `jax.Array`s placed by `shardings.params`) read from `reader`, each device's slice
    straight into its place; dtypes are `config.model.param_dtype`."""
    maps = {t.lm_path: t for t in architectures.tensors(config, reader.hf_config)}
    check_tensors(reader, config, shardings.abstract_params)

    def load(path, leaf, sharding):
        relative, stacked, layers = _lm_place(path, config)
        tensor = maps[relative]

        def callback(layer, shape):
            return lambda index: np.asarray(read_shard(reader, tensor, layer, shape, index), dtype=leaf.dtype)

        if not stacked:
            return jax.make_array_from_callback(leaf.shape, sharding, callback(layers[0], leaf.shape))
        layer_sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
        stack = jax.jit(functools.partial(jax.numpy.zeros, leaf.shape, leaf.dtype), out_shardings=sharding)()
        put = _put_layer(sharding)
        for i, layer in enumerate(layers):
            stack = put(stack, jax.make_array_from_callback(leaf.shape[1:], layer_sharding,
                                                            callback(layer, leaf.shape[1:])), i)
        return stack

    return jax.tree_util.tree_map_with_path(load, shardings.abstract_params, shardings.params)


@functools.lru_cache(maxsize=None)
def _put_layer(sharding):
    """`stack.at[i].set(layer)` in place: the stack's buffer is donated, so no second copy of it exists."""
    return jax.jit(lambda stack, layer, i: jax.lax.dynamic_update_index_in_dim(stack, layer, i, 0),
                   donate_argnums=0, out_shardings=sharding)


# ---------------------------------------------------------------------------------------------------------------
# Export.


def _to_host(x: jax.Array) -> np.ndarray:
    """The whole array on every process's host (a collective when it spans processes)."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def hf_tensors(params, config):
    """Yields `(name, array)`: each Hugging Face tensor of lm `params`, gathered to the host one at a time."""
    by_name: dict[str, list[TensorMap]] = {}
    for tensor in architectures.tensors(config):
        by_name.setdefault(tensor.hf_name, []).append(tensor)

    def lm_array(tensor: TensorMap, layer: int | None, expert: int | None) -> np.ndarray:
        if not tensor.per_layer:
            return _to_host(_get(params, tensor.lm_path))
        return _layer_array(params, config, tensor.lm_path, layer, expert)

    for template, parts in by_name.items():
        parts = sorted(parts, key=lambda t: t.block or (0, 0))  # In column order (GPT-2's fused query/key/value).
        for layer in _layers_of(parts[0], config):
            for expert in range(config.model.moe.num_experts) if parts[0].experts else [None]:
                blocks = []  # M of each part, flattened as the layout says.
                for tensor in parts:
                    lm = lm_array(tensor, layer, expert)
                    if tensor.order is not None:
                        lm = lm[..., np.argsort(tensor.order)]
                    a = math.prod(lm.shape[:tensor.split])
                    blocks.append(lm.reshape(a) if tensor.split == lm.ndim else lm.reshape(a, -1))
                m = np.concatenate(blocks, axis=-1)
                yield template.format(layer=layer, expert=expert), np.ascontiguousarray(m.T if parts[0].transpose
                                                                                        else m)


def _layers_of(tensor: TensorMap, config) -> range | list[None]:
    """The layers that have `tensor`'s parameter (`[None]`: one at the root)."""
    if not tensor.per_layer:
        return [None]
    return range(*tensor.layers) if tensor.layers else range(config.model.num_layers)


def lora_tensors(adapters, config):
    """Yields `(name, array)`: PEFT's `lora_A` `[r, in]` and `lora_B` `[out, r]` of each LoRA adapter in `adapters`
    (a run's adapter tree, `lm.peft.split`), named after the module of the kernel it adapts
    (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`)."""
    for tensor in architectures.tensors(config):
        if not tensor.per_layer or tensor.lm_path[-1] != "kernel":
            continue
        for layer in _layers_of(tensor, config):
            try:
                a, b = (_layer_array(adapters, config, (*tensor.lm_path[:-1], name), layer)
                        for name in ("lora_a", "lora_b"))
            except KeyError:  # Not a target.
                continue
            r = a.shape[-1]
            module = "base_model.model." + tensor.hf_name.format(layer=layer).removesuffix(".weight")
            yield f"{module}.lora_A.weight", np.ascontiguousarray(a.reshape(-1, r).T)
            yield f"{module}.lora_B.weight", np.ascontiguousarray(b.reshape(r, -1).T)


def _layer_array(params, config, path: tuple[str, ...], layer: int, expert: int | None = None) -> np.ndarray:
    """Layer `layer` of the per-layer parameter at `path` (relative to a block), on the host; only expert `expert`
    of an experts' stack when given (sliced before it leaves the devices)."""
    if config.model.scan_layers:
        name, first = next((name, first) for name, first, count, _ in model_lib.layer_stacks(config.model)
                           if first <= layer < first + count)
        array = _get(params, (name, *path))[layer - first]
    else:
        array = _get(params, (f"layers_{layer}", *path))
    return _to_host(array if expert is None else array[expert])


def _get(tree, keys: tuple[str, ...]):
    for key in keys:
        tree = tree[key]
    return tree


def save_params(params, config, directory: str, max_shard_bytes: int) -> list[str]:
    """Writes `params` as Hugging Face safetensors into `directory` (process 0 writes; every process must call it,
    since gathering is collective); returns the file names written."""
    write = jax.process_index() == 0
    shard: dict[str, np.ndarray] = {}
    written: list[tuple[str, list[str]]] = []  # (temporary file, its tensor names); renamed once the count is known
    shard_bytes = total_bytes = 0

    def flush():
        temporary = os.path.join(directory, f"shard-{len(written):05d}.tmp")
        if write:
            write_safetensors(temporary, shard)
        written.append((temporary, list(shard)))
        shard.clear()

    for name, array in hf_tensors(params, config):
        if shard and shard_bytes + array.nbytes > max_shard_bytes:
            flush()
            shard_bytes = 0
        shard[name] = array
        shard_bytes += array.nbytes
        total_bytes += array.nbytes
    flush()
    files = [SINGLE_FILE] if len(written) == 1 else [
        f"model-{i + 1:05d}-of-{len(written):05d}.safetensors" for i in range(len(written))]
    if write:
        for (temporary, _), file in zip(written, files):
            os.replace(temporary, os.path.join(directory, file))
        if len(files) > 1:
            weight_map = {name: file for (_, names), file in zip(written, files) for name in names}
            with open(os.path.join(directory, INDEX_FILE), "w") as f:
                json.dump({"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))},
                          f, indent=2)
    return files


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.flax import save_file

    with _on_host():
        save_file({name: jax.numpy.asarray(array) for name, array in tensors.items()}, path,
                  metadata={"format": "pt"})
