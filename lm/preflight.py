"""Pre-flight: what a run needs on a target mesh, worked out on any machine before the accelerators are rented.

    python -m lm.preflight --config=configs/llama_8b.py --mesh=data=1,fsdp=64,tensor=1 --device=h100 --mfu=0.4 \
        [--config.field=value ...]

`--mesh` gives the total size of each mesh axis (unnamed axes are 1; one may be -1 with `--devices=N`); without it
the config's own `config.mesh` is used, over `--devices`. Nothing is allocated and no device is touched: the model
and the optimizer are evaluated abstractly (`jax.eval_shape`), and the run's own placement code
(`lm.sharding.Shardings`) places them on a `jax.sharding.AbstractMesh` of the target sizes, so a laptop sizes a
64-device run exactly as the run will place it.

Per device of the target mesh it reports:

- parameters, gradients and optimizer state, exact from their shard shapes, for the configured ZeRO stage and, in a
  table, for all four;
- activations, an analytic estimate (`activation_bytes`) for the configured batch, remat policy and attention
  implementation;
- FLOPs per step: `lm.flops.train_flops_per_token(config, seq_len)` x tokens per step (model FLOPs; remat recompute
  excluded, as in MFU);
- the step time those FLOPs take at the given MFU on the named device kind's datasheet bf16 peak;
- a WARNING when parameters, gradients, optimizer state and activations together exceed the device's memory.

With `--compile`, the train step is also compiled on this machine's own backend and devices (a GPU host checks a
GPU step; on a CPU, `XLA_FLAGS=--xla_force_host_platform_device_count=N` gives N devices) for the same mesh, and
XLA's own per-device figures (`compiled.memory_analysis()`: arguments, outputs, temporaries, donated aliases) are
printed beside the estimate. This compiles, so it takes as long as a run's first step does.
"""

from __future__ import annotations

import dataclasses
import math

from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import AbstractMesh
from ml_collections import config_flags

from lm import attention as attention_lib
from lm import config as lm_config
from lm import flops
from lm import model as model_lib
from lm import optim
from lm import peft
from lm import sharding as sharding_lib
from lm.errors import ArgumentError

GB = 1e9

# Device names accepted by `--device`, and the `jax.Device.device_kind` each stands for (the key into
# `lm.flops.PEAK_BF16_FLOPS` and `lm.flops.HBM_BYTES`).
DEVICE_KINDS = {
    "h100": "NVIDIA H100 80GB HBM3",
    "h100-pcie": "NVIDIA H100 PCIe",
    "h200": "NVIDIA H200",
    "a100-40gb": "NVIDIA A100-SXM4-40GB",
    "a100-80gb": "NVIDIA A100-SXM4-80GB",
    "v4": "TPU v4",
    "v5e": "TPU v5 lite",
    "v5p": "TPU v5",
    "v6e": "TPU v6 lite",
}


class PreflightError(ArgumentError):
    """A pre-flight argument (`--mesh`, `--device`, `--mfu`) is malformed. The message is one line."""


def device_kind(name: str) -> str:
    """The device kind for a `--device` name (`h100`, `v5e`, `tpu-v5p`, `A100-80GB`, ...)."""
    key = name.strip().lower().replace("_", "-").removeprefix("tpu-").removeprefix("tpu")
    if key not in DEVICE_KINDS:
        raise PreflightError(f"--device={name!r} is not one of {', '.join(DEVICE_KINDS)}")
    return DEVICE_KINDS[key]


def parse_mesh(text: str) -> ml_collections.ConfigDict:
    """`data=1,fsdp=64,tensor=1` as a `config.mesh`-like ConfigDict of total sizes; unnamed axes are 1."""
    sizes = dict.fromkeys(sharding_lib.MESH_AXES, 1)
    named = set()
    for item in text.split(","):
        axis, _, size = item.strip().partition("=")
        if axis not in sizes or axis in named:
            reason = "repeats" if axis in named else f"names no mesh axis ({', '.join(sharding_lib.MESH_AXES)})"
            raise PreflightError(f"--mesh={text!r}: {item.strip()!r} {reason}; expected e.g. data=1,fsdp=64,tensor=1")
        try:
            sizes[axis] = int(size)
        except ValueError:
            raise PreflightError(f"--mesh={text!r}: the size of {axis} must be an integer, got {size!r}") from None
        named.add(axis)
    return ml_collections.ConfigDict(sizes)


def mesh_sizes(mesh_config: ml_collections.ConfigDict, devices: int | None = None) -> dict[str, int]:
    """Total size of each mesh axis (ICI x DCN) for `mesh_config` over `devices` devices (None: the sizes' product,
    which needs no -1)."""
    sizes = {axis: mesh_config.get(axis, 1) for axis in sharding_lib.MESH_AXES}
    sizes.update({f"dcn_{axis}": mesh_config.get(f"dcn_{axis}", 1) for axis in sharding_lib.MESH_AXES})
    if devices is not None and devices < 1:
        raise PreflightError(f"--devices={devices} must be a positive number of devices")
    if devices is None:
        filled = [f"{axis}=-1" for axis, size in sizes.items() if size == -1]
        if filled:
            raise PreflightError(f"mesh size {filled[0]} means 'the remaining devices': give --devices=N (or --mesh)")
        devices = math.prod(sizes.values())
    shape = sharding_lib.mesh_shape(mesh_config, devices)
    return {axis: ici * dcn for axis, (ici, dcn) in shape.items()}


def tokens_per_device(config: ml_collections.ConfigDict, sizes: dict[str, int]) -> int:
    """Tokens one device holds in one forward/backward pass: its rows of one micro-batch times the sequence length."""
    data_parallel = math.prod(sizes.get(axis, 1) for axis in sharding_lib.DATA_AXES)
    return config.data.batch_size // (data_parallel * config.optim.microbatches) * config.data.seq_len


def activation_bytes(config: ml_collections.ConfigDict, sizes: dict[str, int], attention: str) -> dict[str, int]:
    """Analytic estimate of one device's activation memory in a train step, by component, in bytes.

    Per token and layer, with s bytes per element of the compute dtype, d d_model, h head dim, T seq_len, and the
    query heads q = n*h, key/value widths kv = 2*g*h, MLP width m = f (x2 for SwiGLU's gate and up) counted on one
    device (divided by the tensor-parallel size; `embed` is not split):

    - what a layer keeps for the backward pass, by remat policy: `full` the layer input, s*d; `dots_no_batch` the
      outputs of the projection matmuls, s*(2d + q + kv + m); `dots` also the attention scores and weighted values
      in fp32, 4*(n*T + q), when XLA computes attention (a flash kernel keeps none); `none` every intermediate:
      fp32 norm internals 24d, s*(2d + 2q + kv + 3m), scores (fp32) and probabilities, (4 + s)*n*T with XLA
      attention, plus each layer's weights cast to the compute dtype.
    - the working set of the one layer recomputed in the backward pass (remat policies other than `none`): that
      layer's intermediates as for `none`, plus its weights in the compute dtype twice (in use and prefetched;
      all-gathered at ZeRO stage 3).
    - outside the layers: the final norm's fp32 internals, 12d, and the blockwise loss: fp32 logits and their
      gradient for one vocabulary block, 8*chunk_size, and the fp32 gradient of the hidden states, 4d.

    These are the arrays the program asks for, checked against JAX's saved residuals for each policy
    (tests/test_preflight.py); XLA's buffer reuse and fusion can make the real peak lower, temporaries of fused
    kernels and fragmentation higher. Gradient-accumulation buffers are counted as gradients, not here.
    """
    m = config.model
    tensor = sizes["tensor"]
    split = lambda width: width // tensor if width % tensor == 0 else width  # This device's share of a split width.
    s = jnp.dtype(m.dtype).itemsize
    d, h, length = m.d_model, lm_config.head_dim(m), config.data.seq_len
    heads = split(m.num_heads)
    q, kv = heads * h, 2 * split(m.num_kv_heads) * h
    mlp = (2 if m.mlp_activation == "swiglu" else 1) * split(m.mlp_dim)
    scores = heads * length if attention == "xla" else 0  # [heads, keys] per query; flash kernels keep none.
    every = 24 * d + s * (2 * d + 2 * q + kv + 3 * mlp) + (4 + s) * scores
    kept = {
        "none": every,
        "full": s * d,
        "dots_no_batch": s * (2 * d + q + kv + mlp),
        "dots": s * (2 * d + q + kv + mlp) + 4 * (scores + (q if attention == "xla" else 0)),
    }[m.remat_policy]
    layer_weights = s * flops.layer_param_count(config, moe=bool(m.moe.num_experts)) // tensor
    tokens = tokens_per_device(config, sizes)
    out = {"layers, kept for the backward pass": m.num_layers * tokens * kept + tokens * 12 * d}
    if m.remat_policy == "none":
        out["layers, kept for the backward pass"] += m.num_layers * layer_weights
    else:
        out["one layer recomputed in the backward pass"] = tokens * every + 2 * layer_weights
    out["loss, one vocabulary block"] = tokens * (8 * min(config.loss.chunk_size, m.vocab_size) + 4 * d)
    return out


@dataclasses.dataclass(frozen=True)
class StateMemory:
    """Bytes one device holds of the train state, by part."""

    params: int
    grads: int
    opt_state: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.opt_state


def _count(parameters: int) -> str:
    """`1,235,814,400 (1.24 B)`, or in millions below a billion."""
    return (f"{parameters:,} ({parameters / 1e9:.2f} B)" if parameters >= 1e9 else
            f"{parameters:,} ({parameters / 1e6:.2f} M)")


@dataclasses.dataclass(frozen=True)
class Estimate:
    """What `estimate` works out for one config on one target mesh and device kind. Bytes are per device."""

    parameters: int
    active_parameters: int  # Those one token uses (a mixture of experts routes it to a few experts).
    mesh: dict[str, int]
    zero_stage: int
    device: str  # The device kind (`jax.Device.device_kind` spelling).
    device_memory: int
    peak_flops: float
    mfu: float
    attention: str
    stages: dict[int, StateMemory]  # The train state at each ZeRO stage 0-3.
    activations: dict[str, int]  # Component -> bytes (`activation_bytes`).
    tokens_per_step: int
    flops_per_step: float

    @property
    def devices(self) -> int:
        return math.prod(self.mesh.values())

    @property
    def state(self) -> StateMemory:
        """The train state at the configured ZeRO stage."""
        return self.stages[self.zero_stage]

    @property
    def activation_total(self) -> int:
        return sum(self.activations.values())

    @property
    def total(self) -> int:
        return self.state.total + self.activation_total

    @property
    def fits(self) -> bool:
        return self.total <= self.device_memory

    @property
    def step_time(self) -> float:
        """Seconds per step at `mfu` of the devices' peak."""
        return self.flops_per_step / (self.devices * self.peak_flops * self.mfu)


def estimate(config: ml_collections.ConfigDict, sizes: dict[str, int], device: str = "h100",
             mfu: float = 0.4) -> Estimate:
    """Everything the pre-flight reports, for `config` on a mesh of total axis `sizes` (`mesh_sizes`; an axis not
    named has size 1) of `device`s.

    Raises `ConfigError` for a config the mesh cannot run (batch or heads not divisible) and `PreflightError` for an
    unknown device or an MFU outside (0, 1].
    """
    kind = device_kind(device)
    sizes = {axis: sizes.get(axis, 1) for axis in sharding_lib.MESH_AXES}
    if not 0 < mfu <= 1:
        raise PreflightError(f"--mfu={mfu} must be a fraction in (0, 1]")
    lm_config.validate(config)
    mesh = AbstractMesh(tuple(sizes[axis] for axis in sharding_lib.MESH_AXES), sharding_lib.MESH_AXES)
    sharding_lib.check_divisibility(config, mesh)
    model = model_lib.build(config)
    optimizer = optim.make_optimizer(config)
    boxed_params = jax.eval_shape(lambda: model_lib.init(model, jax.random.key(0)))
    abstract_params = nn.unbox(boxed_params)
    abstract_trainable = peft.trainable(abstract_params, config)[1]  # A PEFT run's adapters; else every parameter.
    abstract_state = jax.eval_shape(optimizer.init, abstract_trainable)
    stages = {}
    for stage in range(4):
        staged = config.copy_and_resolve_references()
        staged.sharding.zero_stage = stage
        shardings = sharding_lib.Shardings(staged, mesh, boxed_params, optimizer)
        # Full-parameter DPO's reference is a second copy of the parameters (`lm.peft.trainable`).
        reference = 0 if peft.is_peft(staged) else sharding_lib.bytes_per_device(shardings.abstract_frozen,
                                                                                   shardings.frozen)
        stages[stage] = StateMemory(
            params=sharding_lib.bytes_per_device(abstract_params, shardings.params) + reference,
            grads=sharding_lib.bytes_per_device(abstract_trainable, shardings.grads),
            opt_state=sharding_lib.bytes_per_device(abstract_state, shardings.opt_state))
    attention = attention_lib.resolve_implementation(
        config.model.attention, config.model.dtype, backend="gpu" if kind.startswith("NVIDIA") else "tpu")
    tokens_per_step = config.data.batch_size * config.data.seq_len
    return Estimate(
        parameters=flops.param_count(config), active_parameters=flops.active_param_count(config), mesh=dict(sizes), zero_stage=config.sharding.zero_stage, device=kind,
        device_memory=flops.device_memory_bytes(kind), peak_flops=flops.device_peak_flops(kind), mfu=mfu,
        attention=attention, stages=stages, activations=activation_bytes(config, sizes, attention),
        tokens_per_step=tokens_per_step,
        flops_per_step=flops.train_flops_per_token(config, config.data.seq_len) * tokens_per_step)


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
    """Per-device bytes of a compiled train step, as XLA reports them (`jax.stages.Compiled.memory_analysis()`)."""

    backend: str
    devices: int
    arguments: int  # The train state and the batch.
    outputs: int  # The new train state and the metrics.
    aliased: int  # Outputs written into donated arguments (the train state): counted once.
    temporaries: int  # Everything else live during the step: activations, gradients, workspace.

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries


def compiled_memory(config: ml_collections.ConfigDict, sizes: dict[str, int]) -> CompiledMemory:
    """Compiles `config`'s train step on a mesh of total axis `sizes` over this machine's first devices (no data
    is allocated: the step is lowered from abstract shapes) and returns what XLA says each device needs."""
    from lm import train_step as train_step_lib  # The training floor: only for --compile.

    needed, devices = math.prod(sizes.values()), jax.devices()
    if needed > len(devices):
        raise PreflightError(f"--compile needs the {needed} devices of the mesh on this machine's backend "
                             f"({devices[0].platform}), which has {len(devices)}; on a CPU set XLA_FLAGS="
                             f"--xla_force_host_platform_device_count={needed}")
    placed = config.copy_and_resolve_references()
    for axis in sharding_lib.MESH_AXES:  # The target's total sizes, all within this host.
        placed.mesh[axis], placed.mesh[f"dcn_{axis}"] = sizes.get(axis, 1), 1
    training = train_step_lib.build(placed, devices[:needed])
    state = jax.eval_shape(training.init_state)
    batch = {name: jax.ShapeDtypeStruct((config.data.batch_size, config.data.seq_len),
                                        jnp.float32 if name == "weights" else jnp.int32)
             for name in ("inputs", "targets", "segment_ids", "positions", "weights")}
    analysis = training.train_step().lower(state, batch, training.abstract_frozen()).compile().memory_analysis()
    return CompiledMemory(backend=devices[0].platform, devices=needed,
                          arguments=analysis.argument_size_in_bytes, outputs=analysis.output_size_in_bytes,
                          aliased=analysis.alias_size_in_bytes, temporaries=analysis.temp_size_in_bytes)


def compiled_report(result: Estimate, compiled: CompiledMemory) -> str:
    """The `--compile` lines: XLA's per-device figures beside the estimate's."""
    return "\n".join([
        f"compiled on {compiled.devices} x {compiled.backend} (this machine's backend), per device (GB):",
        f"  arguments (state, batch) {compiled.arguments / GB:9.3f}   estimate of the state "
        f"{(result.state.params + result.state.opt_state) / GB:9.3f}",
        f"  outputs                  {compiled.outputs / GB:9.3f}   (donated: {compiled.aliased / GB:.3f} written in "
        f"place)",
        f"  temporaries              {compiled.temporaries / GB:9.3f}   estimate of gradients and activations "
        f"{(result.state.grads + result.activation_total) / GB:9.3f}",
        f"  total                    {compiled.total / GB:9.3f}   estimate {result.total / GB:9.3f}",
    ])


def stage_table(result: Estimate) -> str:
    """Per-device train state at each ZeRO stage, in GB; the configured stage is marked with *."""
    lines = [f"{'stage':>5}  {'params GB':>10}  {'grads GB':>10}  {'opt state GB':>12}  {'total GB':>9}  (per device)"]
    for stage, memory in result.stages.items():
        mark = "*" if stage == result.zero_stage else " "
        lines.append(f"{stage:>4}{mark}  {memory.params / GB:>10.3f}  {memory.grads / GB:>10.3f}  "
                     f"{memory.opt_state / GB:>12.3f}  {memory.total / GB:>9.3f}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


def report(config: ml_collections.ConfigDict, result: Estimate) -> str:
    """The pre-flight printout: model, target, per-device memory, stage table, FLOPs, step time, warning."""
    m, d = config.model, config.data
    state, memory_gb = result.state, result.device_memory / GB
    mesh = " ".join(f"{axis}={size}" for axis, size in result.mesh.items())
    rows_per_device = d.batch_size // math.prod(result.mesh[axis] for axis in sharding_lib.DATA_AXES)
    lines = [
        f"model: {m.num_layers} layers, d_model {m.d_model}, {m.num_heads}/{m.num_kv_heads} heads, mlp {m.mlp_dim}, "
        f"vocab {m.vocab_size}; {m.param_dtype} parameters, {m.dtype} compute, remat {m.remat_policy}, "
        f"attention {result.attention}",
        f"parameters: {_count(result.parameters)}" + (f", {_count(result.active_parameters)} active per token"
                                                       if result.active_parameters != result.parameters else ""),
        f"target: {result.devices} x {result.device} ({result.device_memory / flops.GiB:.0f} GiB = {memory_gb:.1f} GB, "
        f"{result.peak_flops / 1e12:.0f} TFLOP/s bf16 peak), mesh {mesh}, ZeRO stage {result.zero_stage}, "
        f"optimizer {config.optim.optimizer}",
        "per device (GB = 1e9 bytes):",
        f"  parameters        {state.params / GB:9.3f}",
        f"  gradients         {state.grads / GB:9.3f}",
        f"  optimizer state   {state.opt_state / GB:9.3f}",
        f"  activations       {result.activation_total / GB:9.3f}  (estimate: {rows_per_device} rows x {d.seq_len} "
        f"tokens per device in {config.optim.microbatches} micro-batch(es))",
        *(f"    {name:<42} {size / GB:9.3f}" for name, size in result.activations.items()),
        f"  total             {result.total / GB:9.3f}  of {memory_gb:.1f}",
        stage_table(result),
        f"FLOPs per step: {result.flops_per_step:.3e} ({result.flops_per_step / result.tokens_per_step / 1e9:.2f} "
        f"GFLOP/token x {result.tokens_per_step:,} tokens; model FLOPs, remat recompute excluded)",
        f"step time at {result.mfu:.0%} MFU: {result.step_time:.2f} s ({result.tokens_per_step / result.step_time:,.0f} "
        f"tokens/s); {config.total_steps:,} steps: {_duration(config.total_steps * result.step_time)}",
    ]
    if not result.fits:
        remedies = ["more devices on fsdp or tensor"]
        if rows_per_device // config.optim.microbatches > 1:
            remedies.insert(0, "more config.optim.microbatches")
        if m.remat_policy != "full":
            remedies.insert(0, "config.model.remat_policy=full")
        if result.zero_stage < 3:
            remedies.insert(0, "config.sharding.zero_stage=3")
        lines.append(f"WARNING: {result.total / GB:.1f} GB per device exceeds the {memory_gb:.1f} GB of one "
                     f"{result.device}; try {', '.join(remedies)}")
    return "\n".join(lines)


def _define_flags() -> None:
    """The CLI's flags, defined only when it runs, so importing this module (`lm.bench.sharding`) defines none."""
    config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py).")
    flags.mark_flag_as_required("config")
    flags.DEFINE_string("mesh", None, "Target mesh as total axis sizes, e.g. data=1,fsdp=64,tensor=1 (unnamed axes "
                        "1); default: config.mesh over --devices.")
    flags.DEFINE_integer("devices", None, "Number of target devices; needed when a mesh size is -1.")
    flags.DEFINE_string("device", "h100", f"Target device kind: {', '.join(DEVICE_KINDS)}.")
    flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation assumed for the step time, a fraction in (0, 1].")
    flags.DEFINE_bool("compile", False, "Also compile the train step on this machine's backend for the mesh and "
                      "print XLA's per-device memory beside the estimate.")


def main(argv):
    del argv
    args = flags.FLAGS
    if not args.compile:  # Nothing computes: keep JAX off any accelerator of this machine (and off its memory).
        jax.config.update("jax_platforms", "cpu")
    mesh_config = parse_mesh(args.mesh) if args.mesh else args.config.mesh
    sizes = mesh_sizes(mesh_config, args.devices)
    result = estimate(args.config, sizes, args.device, args.mfu)
    print(report(args.config, result), flush=True)
    if args.compile:
        print(compiled_report(result, compiled_memory(args.config, sizes)))


if __name__ == "__main__":
    from lm import cli

    _define_flags()
    cli.run(main)
