"""Placement: the device mesh, logical-axis rules and ZeRO stages, all expressed as `NamedSharding`s.

Every program that puts a model on devices (training, restoring, evaluation, sampling, the pre-flight) asks this
module: `make_mesh` / `default_mesh` for the mesh, `model_shardings(config, mesh, optimizer)` for the `Shardings` of
the config's model (and optimizer state) on it, `abstract_arrays` for the `ShapeDtypeStruct`s that orbax restores
into.

One mesh with axes `data`, `fsdp`, `expert`, `tensor`. Parameters carry logical axis names (`embed`, `heads`, ...; see
`lm.model`); `config.sharding.logical_axis_rules` maps them to mesh axes. ZeRO is nothing but a choice of shardings,
and XLA's SPMD partitioner derives the collectives from them:

| stage | parameters | gradients | optimizer state |
|---|---|---|---|
| 0 | tensor-parallel only (replicated over data axes) | like parameters: all-reduce | like parameters |
| 1 | as stage 0 | as stage 0 | partitioned over (`data`, `fsdp`) |
| 2 | as stage 0 | partitioned like the optimizer state: reduce-scatter | partitioned |
| 3 | partitioned (FSDP), all-gathered per layer inside the scan | partitioned | partitioned |

"Partitioned over the data axes" (`zero_spec`) adds the combined (`data`, `fsdp`) axes to one dimension of a leaf:
the largest dimension that is not already sharded, not the scanned `layers` dimension, and divisible by the
data-parallel size. A leaf without such a dimension, or with fewer than `MIN_SHARDED_ELEMENTS` elements (scalars,
step counters, small norms), stays replicated over the data axes. This works for any optax state tree: leaves that
mirror parameters (Adam's `mu`/`nu`, momentum) inherit the parameter's tensor-parallel spec through
`optax.tree_utils.tree_map_params`; other leaves (Adafactor's factored moments, counts) are placed by shape alone.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec as P

from lm import model as model_lib
from lm import peft
from lm.errors import ConfigError

MESH_AXES = ("data", "fsdp", "expert", "tensor")
# The data-parallel axes: batch and ZeRO partitioning. `expert` is one of them: the layers other than the experts are
# data parallel over it (MaxText's layout), while the experts themselves are split over it (the `expert` rule).
DATA_AXES = ("data", "fsdp", "expert")
# Logical axes whose rules keep their data axes for parameters too: the experts of a mixture-of-experts layer.
EXPERT_PARALLEL = ("expert",)
# Leaves smaller than this stay replicated: partitioning them saves no memory worth a collective.
MIN_SHARDED_ELEMENTS = 2 ** 12


def _fill_sizes(sizes: dict[str, int], device_count: int, what: str) -> dict[str, int]:
    """Replaces one -1 with what is left of `device_count`; checks the product."""
    unknown = [axis for axis, size in sizes.items() if size == -1]
    if len(unknown) > 1:
        raise ConfigError(
            f"{what}: only one mesh axis may be -1, got {', '.join(f'{a}=-1' for a in unknown)}")
    for axis, size in sizes.items():
        if size != -1 and (not isinstance(size, int) or size < 1):
            raise ConfigError(f"{what}: mesh axis {axis} must be a positive integer or -1, got {size!r}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if unknown:
        if device_count % known:
            raise ConfigError(
                f"{what}: {device_count} devices do not divide by the fixed axes' product {known}")
        sizes = {**sizes, unknown[0]: device_count // known}
    if math.prod(sizes.values()) != device_count:
        shape = " x ".join(f"{axis}={size}" for axis, size in sizes.items())
        raise ConfigError(
            f"{what}: {shape} = {math.prod(sizes.values())} devices, but there are {device_count}")
    return sizes


def mesh_shape(mesh_config: ml_collections.ConfigDict, device_count: int,
               granules: int = 1) -> dict[str, tuple[int, int]]:
    """(within-host ICI size, across-host DCN size) of each mesh axis; -1 in the ICI sizes fills the rest.

    `granules` is how many groups of devices the fast interconnect joins (hosts, or TPU slices; see `make_mesh`).
    When there are several, each with several devices, and `config.mesh.dcn_*` are all 1 (not set), the data axis
    crosses them (`dcn_data = granules`: data parallelism needs one gradient reduction per step, the traffic the
    slow network can carry) and the ICI sizes describe one granule, so fsdp and tensor stay inside it. Sizes that
    already multiply to every device are taken as they are.
    """
    dcn = {axis: mesh_config.get(f"dcn_{axis}", 1) for axis in MESH_AXES}
    ici = {axis: mesh_config[axis] for axis in MESH_AXES}
    if all(size == 1 for size in dcn.values()) and 1 < granules < device_count and device_count % granules == 0:
        per_granule = device_count // granules
        known = math.prod(size for size in ici.values() if size != -1)
        if known >= 1 and ((-1 in ici.values() and per_granule % known == 0) or known == per_granule):
            dcn["data"] = granules
    dcn = _fill_sizes(dcn, math.prod(s for s in dcn.values() if s != -1), "config.mesh.dcn_*")
    dcn_product = math.prod(dcn.values())
    if device_count % dcn_product:
        raise ConfigError(
            f"config.mesh.dcn_*: {device_count} devices do not split into {dcn_product} hosts/slices")
    ici = _fill_sizes(ici, device_count // dcn_product, "config.mesh")
    return {axis: (ici[axis], dcn[axis]) for axis in MESH_AXES}


def make_mesh(mesh_config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (`data`, `fsdp`, `tensor`) mesh. Axes with a DCN size > 1 span hosts (or TPU slices); the rest of each
    axis stays within a host, so tensor and FSDP traffic runs over the fast interconnect. Without `dcn_*` sizes, a
    run over several multi-device hosts or slices puts them on the data axis (`mesh_shape`)."""
    devices = list(jax.devices() if devices is None else devices)
    # Granules: TPU slices (the hosts of one slice share its ICI); elsewhere (GPU hosts, CPU processes) each process
    # is one. (GPU and CPU devices of a multi-process run carry a `slice_index` too, 0 for all: not granules.)
    process_is_granule = devices[0].platform != "tpu"
    granules = len({d.process_index if process_is_granule else d.slice_index for d in devices})
    shape = mesh_shape(mesh_config, len(devices), granules)
    ici_shape = [shape[axis][0] for axis in MESH_AXES]
    dcn_shape = [shape[axis][1] for axis in MESH_AXES]
    if math.prod(dcn_shape) > 1:
        device_array = mesh_utils.create_hybrid_device_mesh(
            ici_shape, dcn_shape, devices, process_is_granule=process_is_granule)
    else:
        try:
            device_array = mesh_utils.create_device_mesh(ici_shape, devices)
        except (AssertionError, NotImplementedError, ValueError):
            # Device kinds without a known topology (e.g. simulated CPU devices in odd counts): plain order.
            device_array = np.asarray(devices).reshape(ici_shape)
    return Mesh(device_array, MESH_AXES)


def default_mesh(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The run's own mesh (`config.mesh`) when it fits the devices here, else every device on `fsdp` (parameters
    sharded, so a model trained on many devices still fits; batches are split over (data, fsdp) either way)."""
    devices = jax.devices() if devices is None else devices
    try:
        return make_mesh(config.mesh, devices)
    except ConfigError:
        fallback = ml_collections.ConfigDict(config.mesh.to_dict())
        fallback.update(data=1, fsdp=-1, expert=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_expert=1, dcn_tensor=1)
        return make_mesh(fallback, devices)


def mesh_of(params, config: ml_collections.ConfigDict) -> Mesh:
    """The mesh `params` live on (as `lm.checkpoint.restore` placed them), or `default_mesh(config)` for arrays
    without a `NamedSharding`."""
    sharding = getattr(jax.tree.leaves(params)[0], "sharding", None)
    if isinstance(sharding, NamedSharding):
        return sharding.mesh
    return default_mesh(config)


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[axis] for axis in DATA_AXES)


def logical_rules(config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
                 for name, axes in config.sharding.logical_axis_rules)


def batch_sharding(config: ml_collections.ConfigDict, mesh: Mesh | AbstractMesh) -> NamedSharding:
    """Sharding of `[batch, length]` arrays (batches, token ids) by the config's logical rules."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch", "length"), logical_rules(config)))


def from_host(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array of a host array that every process holds whole (each process places its own devices' pieces;
    `jax.device_put` would need every device to be this process's)."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def row_shards(batch: NamedSharding) -> int:
    """How many pieces the `[batch, length]` sharding `batch` cuts the rows into: row counts must be multiples."""
    devices = batch.mesh.size
    return devices // batch.shard_shape((devices, 1))[0]


def _without_axes(rules, removed: Sequence[str], keep: Sequence[str] = ()):
    """The rules with some mesh axes removed (e.g. parameters below ZeRO stage 3 are not split over data axes),
    except in the rules of the logical axes `keep`."""
    out = []
    for name, axes in rules:
        if name in keep:
            out.append((name, axes))
            continue
        axes_tuple = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept = tuple(a for a in axes_tuple if a not in removed)
        out.append((name, kept[0] if len(kept) == 1 else (kept or None)))
    return tuple(out)


def _axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def _divisible_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Drops the mesh axes of any dimension they do not divide (that dimension is then replicated)."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    return P(*(axes if axes is not None and size % _axis_size(mesh, axes) == 0 else None
               for axes, size in zip(entries, shape)))


def zero_spec(spec: P, shape: Sequence[int], mesh: Mesh, skip_dims: Sequence[int] = ()) -> P:
    """`spec` with the data axes added to one more dimension (module docstring), or `spec` unchanged."""
    dp = data_parallel_size(mesh)
    entries = list(spec) + [None] * (len(shape) - len(spec))
    used = {a for axes in entries if axes is not None for a in ((axes,) if isinstance(axes, str) else axes)}
    if dp == 1 or math.prod(shape) < MIN_SHARDED_ELEMENTS or used & set(DATA_AXES):
        return P(*entries)
    candidates = [i for i in range(len(shape)) if entries[i] is None and i not in skip_dims and shape[i] % dp == 0]
    if not candidates:
        return P(*entries)
    dim = max(candidates, key=lambda i: shape[i])
    entries[dim] = DATA_AXES
    return P(*entries)


class Shardings:
    """Every `NamedSharding` a training run needs, for one config, mesh and ZeRO stage.

    Built from the boxed abstract parameters (`jax.eval_shape` of `lm.model.init`), which carry the logical names.
    `params`, `grads` and `opt_state` are pytrees of `NamedSharding`; `batch` shards `[batch, length]` arrays;
    `abstract_params` are the parameters' `ShapeDtypeStruct`s (unboxed). `params` covers the whole tree; a run
    with adapters (`lm.peft`) trains only `trainable` (its adapters; `frozen` is the base), so gradients and
    optimizer state cover those alone (`abstract_trainable` / `abstract_frozen`: their shapes). Full fine-tuning:
    `trainable` is `params`, `frozen` is `{}` (full-parameter DPO: `params` too, for its reference copy).
    `mesh` may be a `jax.sharding.AbstractMesh` (sizes and names, no devices): `lm.preflight` sizes a run on a
    target mesh that way, with the same placement the run will use.
    """

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh | AbstractMesh, boxed_params, optimizer=None):
        self.mesh = mesh
        self.zero_stage = config.sharding.zero_stage
        self.rules = logical_rules(config)
        # The data axes in the rules place activations (`batch`); where parameters, gradients and optimizer state
        # sit along the data axes is ZeRO's choice, so parameters see the rules without them.
        tensor_rules = _without_axes(self.rules, DATA_AXES, keep=EXPERT_PARALLEL)
        is_spec = lambda x: isinstance(x, P)
        logical_specs = nn.get_partition_spec(boxed_params)
        self.abstract_params = nn.unbox(boxed_params)

        def tensor_parallel(logical: P, leaf) -> P:
            return _divisible_spec(nn.logical_to_mesh_axes(logical, tensor_rules), leaf.shape, mesh)

        def partitioned(logical: P, leaf) -> P:
            # Never along the scanned `layers` dimension: stage 3 gathers one layer at a time inside the scan.
            layers_dims = [i for i, name in enumerate(logical) if name == "layers"]
            return zero_spec(tensor_parallel(logical, leaf), leaf.shape, mesh, skip_dims=layers_dims)

        tp_specs = jax.tree.map(tensor_parallel, logical_specs, self.abstract_params, is_leaf=is_spec)
        zero_specs = jax.tree.map(partitioned, logical_specs, self.abstract_params, is_leaf=is_spec)
        to_named = lambda specs: jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=is_spec)
        self.params = to_named(zero_specs if self.zero_stage >= 3 else tp_specs)
        self.frozen, self.trainable = peft.trainable(self.params, config)
        self.abstract_frozen, self.abstract_trainable = peft.trainable(self.abstract_params, config)
        self.grads = peft.trainable(to_named(zero_specs if self.zero_stage >= 2 else tp_specs), config)[1]
        self._state_specs = peft.trainable(zero_specs if self.zero_stage >= 1 else tp_specs, config)[1]
        self.batch = batch_sharding(config, mesh)
        self.replicated = NamedSharding(mesh, P())
        self.opt_state = None if optimizer is None else self.optimizer_state(optimizer)

    @contextlib.contextmanager
    def activation_rules(self):
        """Context under which the model's `nn.with_logical_constraint` calls take effect (inside jit tracing)."""
        with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh), nn.logical_axis_rules(self.rules):
            yield

    def optimizer_state(self, optimizer: optax.GradientTransformation):
        """Shardings of `optimizer.init(trainable params)`: partitioned over the data axes from stage 1 on."""
        abstract_state = jax.eval_shape(optimizer.init, self.abstract_trainable)

        def other_leaf(leaf):
            spec = P(*([None] * np.ndim(leaf)))
            if self.zero_stage >= 1 and hasattr(leaf, "shape"):
                spec = zero_spec(spec, leaf.shape, self.mesh)
            return NamedSharding(self.mesh, spec)

        def param_like_leaf(leaf, spec, param):
            # Leaves in a parameter-shaped subtree may still differ in shape (Adafactor's factored row/column
            # moments): those are placed by shape.
            if getattr(leaf, "shape", None) != param.shape:
                return other_leaf(leaf)
            return NamedSharding(self.mesh, spec)

        return optax.tree_utils.tree_map_params(
            optimizer, param_like_leaf, abstract_state, self._state_specs, self.abstract_trainable,
            transform_non_params=other_leaf, is_leaf=lambda x: isinstance(x, P))


def model_shardings(config: ml_collections.ConfigDict, mesh: Mesh | AbstractMesh,
                    optimizer: optax.GradientTransformation | None = None,
                    model: model_lib.Transformer | None = None) -> Shardings:
    """The `Shardings` of `config`'s model (and of `optimizer`'s state, if given) on `mesh`, from abstract
    parameters (nothing is allocated). `model`: the `lm.model.Transformer` already built for `config`, if any."""
    model = model_lib.build(config) if model is None else model
    return Shardings(config, mesh, model_lib.abstract_params(model), optimizer)


def abstract_arrays(shapes, shardings):
    """`jax.ShapeDtypeStruct`s of a tree of arrays (or of shapes) with the matching tree of shardings attached:
    the target orbax restores into, directly on the devices each sharding names."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def check_divisibility(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """Errors, before any compile, for shapes the mesh cannot split."""
    dp = data_parallel_size(mesh)
    if config.data.batch_size % dp:
        raise ConfigError(
            f"config.data.batch_size={config.data.batch_size} must be divisible by the data-parallel size "
            f"data*fsdp*expert={dp}")
    microbatches = config.optim.microbatches
    if config.data.batch_size % (dp * microbatches):
        raise ConfigError(
            f"config.data.batch_size={config.data.batch_size} must split into config.optim.microbatches="
            f"{microbatches} micro-batches each divisible by data*fsdp*expert={dp}")
    experts, expert_axis = config.model.moe.num_experts, mesh.shape["expert"]
    if expert_axis > 1 and experts % expert_axis:
        raise ConfigError(f"config.model.moe.num_experts={experts} must be divisible by the expert-parallel size "
                          f"config.mesh.expert={expert_axis}")
    tensor = mesh.shape["tensor"]
    for field in ("num_heads", "vocab_size"):
        value = config.model[field]
        if value % tensor:
            hint = " (pad the vocabulary to a multiple of 128)" if field == "vocab_size" else ""
            raise ConfigError(
                f"config.model.{field}={value} must be divisible by the tensor-parallel size config.mesh.tensor="
                f"{tensor}{hint}")


def bytes_per_device(abstract_tree, sharding_tree) -> int:
    """Bytes one device holds of a tree of arrays (or `ShapeDtypeStruct`s) placed with matching shardings."""
    leaves = jax.tree.leaves(abstract_tree)
    shardings = jax.tree.leaves(sharding_tree, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    return sum(math.prod(sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
               for leaf, sharding in zip(leaves, shardings, strict=True))


def sharding_table(tree_of_arrays, title: str = "") -> str:
    """A printable table: leaf path, shape, dtype, partition spec and bytes per device.

    Accepts concrete arrays (reads their shardings) or `jax.ShapeDtypeStruct`s with a `sharding`.
    """
    rows = []
    total_global = total_device = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree_of_arrays):
        sharding = leaf.sharding
        shard_shape = sharding.shard_shape(leaf.shape)
        itemsize = np.dtype(leaf.dtype).itemsize
        device_bytes = math.prod(shard_shape) * itemsize
        total_global += math.prod(leaf.shape) * itemsize
        total_device += device_bytes
        spec = sharding.spec if isinstance(sharding, NamedSharding) else sharding
        rows.append((jax.tree_util.keystr(path), str(tuple(leaf.shape)), str(leaf.dtype), str(spec),
                     f"{device_bytes:,}"))
    header = ("leaf", "shape", "dtype", "spec", "bytes/device")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))
    out = [title] if title else []
    out += [line(header), line(tuple("-" * w for w in widths))] + [line(r) for r in rows]
    out.append(f"total: {total_global:,} bytes, {total_device:,} bytes per device")
    return "\n".join(out)
