"""The pre-flight check: exact per-device train state, the activation estimate, FLOPs, step time and the CLI."""

import os
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import config as lm_config
from lm import model as model_lib
from lm import optim
from lm import preflight

FSDP_64 = {"data": 1, "fsdp": 64, "expert": 1, "tensor": 1}


def llama_8b_by_hand(config):
    """Parameter and matmul-weight counts of configs/llama_8b.py written out from its dims (not via lm.flops)."""
    m = config.model
    d, n, g, f, h = m.d_model, m.num_heads, m.num_kv_heads, m.mlp_dim, m.d_model // m.num_heads
    attention = d * n * h + 2 * d * g * h + n * h * d  # query, key + value (GQA), output
    mlp = 3 * d * f  # SwiGLU: gate, up, down
    norms = 2 * d  # two RMSNorm scales per layer
    parameters = m.num_layers * (attention + mlp + norms) + m.vocab_size * d + d + d * m.vocab_size  # + embedding,
    matmul_weights = m.num_layers * (attention + mlp) + d * m.vocab_size  # final norm, untied head
    return parameters, matmul_weights


@pytest.fixture(scope="module")
def llama_8b():
    config = lm_config.load("configs/llama_8b.py")
    return config, preflight.estimate(config, FSDP_64, device="h100", mfu=0.4)


# Per-device shard of every llama_8b parameter on fsdp=64 (data=1, tensor=1), fp32 (4 bytes). ZeRO (`zero_spec`)
# splits the largest dimension that is not the scanned `layers` one and divides by 64; every leaf here has such a
# dimension and at least MIN_SHARDED_ELEMENTS = 4,096 elements (the smallest, the final norm, has exactly 4,096),
# so every parameter leaf is split exactly 64 ways:
#   leaf                      global shape            split            elements per device
#   embed/embedding           (128256, 4096)          4096 / 64 = 64   128256 * 64             =   8,208,384
#   lm_head                   (4096, 128256)          4096 / 64 = 64   64 * 128256             =   8,208,384
#   final_norm/scale          (4096,)                 4096 / 64 = 64   64                      =          64
#   layers/.../query/kernel   (32, 4096, 32, 128)     4096 / 64 = 64   32 * 64 * 32 * 128      =   8,388,608
#   layers/.../key/kernel     (32, 4096, 8, 128)      4096 / 64 = 64   32 * 64 * 8 * 128       =   2,097,152
#   layers/.../value/kernel   (32, 4096, 8, 128)      4096 / 64 = 64   32 * 64 * 8 * 128       =   2,097,152
#   layers/.../out/kernel     (32, 32, 128, 4096)     4096 / 64 = 64   32 * 32 * 128 * 64      =   8,388,608
#   layers/mlp/gate/kernel    (32, 4096, 14336)       14336 / 64 = 224 32 * 4096 * 224         =  29,360,128
#   layers/mlp/up/kernel      (32, 4096, 14336)       14336 / 64 = 224 32 * 4096 * 224         =  29,360,128
#   layers/mlp/down/kernel    (32, 14336, 4096)       14336 / 64 = 224 32 * 224 * 4096         =  29,360,128
#   layers/attention_norm     (32, 4096)              4096 / 64 = 64   32 * 64                 =       2,048
#   layers/mlp_norm           (32, 4096)              4096 / 64 = 64   32 * 64                 =       2,048
#                                                                      total = 8,030,261,248 / 64 = 125,472,832
LLAMA_8B_PARAMETERS = 8_030_261_248
LLAMA_8B_SHARD_ELEMENTS = (2 * 128256 * 64 + 64 + 2 * 32 * 64 * 32 * 128 + 2 * 32 * 64 * 8 * 128
                           + 3 * 32 * 4096 * 224 + 2 * 32 * 64)
LLAMA_8B_FULL_BYTES = 4 * LLAMA_8B_PARAMETERS  # 32,121,044,992: one fp32 copy, replicated.
LLAMA_8B_SHARD_BYTES = 4 * LLAMA_8B_SHARD_ELEMENTS  # 501,891,328: one fp32 copy split 64 ways.
# The optimizer state's scalars stay replicated at every stage (fewer than MIN_SHARDED_ELEMENTS elements): AdamW's
# step count (int32, 4) and its schedule's step count (int32, 4), and apply_if_finite's notfinite_count (int32, 4),
# total_notfinite (int32, 4) and last_finite (bool, 1).
ADAMW_SCALAR_BYTES = 4 + 4 + 4 + 4 + 1  # 17


def test_llama_8b_shard_arithmetic_is_self_consistent():
    assert LLAMA_8B_SHARD_ELEMENTS == 125_472_832 == LLAMA_8B_PARAMETERS // 64
    assert LLAMA_8B_PARAMETERS % 64 == 0
    assert LLAMA_8B_SHARD_BYTES == 501_891_328 and LLAMA_8B_FULL_BYTES == 32_121_044_992


def test_optimizer_scalars_are_the_replicated_bytes_counted_by_hand():
    """The only optimizer-state leaves that are not moments: 0-d counters, 17 bytes (ADAMW_SCALAR_BYTES)."""
    config = lm_config.load("configs/llama_8b.py")
    params = nn.unbox(jax.eval_shape(lambda: model_lib.init(model_lib.build(config), jax.random.key(0))))
    state = jax.eval_shape(optim.make_optimizer(config).init, params)
    leaves = jax.tree.leaves(state)
    scalars = [leaf for leaf in leaves if leaf.ndim == 0]
    assert len(leaves) - len(scalars) == 2 * len(jax.tree.leaves(params))  # mu and nu
    assert sum(leaf.dtype.itemsize for leaf in scalars) == ADAMW_SCALAR_BYTES


def test_llama_8b_on_64_devices_matches_hand_arithmetic(llama_8b):
    config, result = llama_8b
    assert config.sharding.zero_stage == 3 and config.model.param_dtype == "float32"
    assert config.optim.optimizer == "adamw"
    parameters, _ = llama_8b_by_hand(config)
    assert result.parameters == parameters == LLAMA_8B_PARAMETERS
    print(f"per device: params {result.state.params:,} B, grads {result.state.grads:,} B, "
          f"optimizer state {result.state.opt_state:,} B")
    # Stage 3: parameters, gradients and both Adam moments split 64 ways; the optimizer's scalars replicated.
    assert result.state.params == 501_891_328 == LLAMA_8B_SHARD_BYTES
    assert result.state.grads == 501_891_328
    assert result.state.opt_state == 1_003_782_673 == 2 * LLAMA_8B_SHARD_BYTES + ADAMW_SCALAR_BYTES


def test_stage_table_shards_one_more_part_per_zero_stage(llama_8b):
    _, result = llama_8b
    full, shard, scalars = LLAMA_8B_FULL_BYTES, LLAMA_8B_SHARD_BYTES, ADAMW_SCALAR_BYTES
    expected = {0: (full, full, 2 * full + scalars), 1: (full, full, 2 * shard + scalars),
                2: (full, shard, 2 * shard + scalars), 3: (shard, shard, 2 * shard + scalars)}
    for stage, (params, grads, opt_state) in expected.items():
        memory = result.stages[stage]
        assert (memory.params, memory.grads, memory.opt_state) == (params, grads, opt_state), stage
    assert result.stages[0].opt_state == 64_242_090_001  # 2 * 32,121,044,992 + 17


def test_small_leaves_stay_replicated_in_exact_per_device_bytes():
    """configs/tiny.py on fsdp=8: the norm scales have fewer than MIN_SHARDED_ELEMENTS = 4,096 elements, so every
    device holds all of them, and a device's share is slightly above total / 8.

    Leaves (d 256, 4 heads of 64, 2 KV heads, SwiGLU 512, vocab 2048, 4 scanned layers), fp32:
      split 8 ways (largest non-`layers` dimension, 256 or 512 -> 32 or 64 per device):
        embedding 2048*256 + lm_head 256*2048 + query 4*256*4*64 + key, value 2 * 4*256*2*64 + out 4*4*64*256
        + gate, up, down 3 * 4*256*512 = 3,407,872 elements -> 425,984 per device
      replicated (below 4,096 elements): final_norm 256 + attention_norm, mlp_norm 2 * 4*256 = 2,304 elements
    """
    config = lm_config.load("configs/tiny.py")
    result = preflight.estimate(config, {"data": 1, "fsdp": 8, "tensor": 1})
    sharded = 2048 * 256 + 256 * 2048 + 4 * 256 * 4 * 64 + 2 * 4 * 256 * 2 * 64 + 4 * 4 * 64 * 256 + 3 * 4 * 256 * 512
    replicated = 256 + 2 * 4 * 256
    assert sharded == 3_407_872 and replicated == 2_304 and sharded + replicated == result.parameters == 3_410_176
    shard = 4 * (sharded // 8 + replicated)  # 4 * 428,288 = 1,713,152 bytes
    full = 4 * (sharded + replicated)  # 13,640,704 bytes
    assert shard == 1_713_152 and shard > full // 8 == 1_705_088
    expected = {0: (full, full, 2 * full + ADAMW_SCALAR_BYTES), 1: (full, full, 2 * shard + ADAMW_SCALAR_BYTES),
                2: (full, shard, 2 * shard + ADAMW_SCALAR_BYTES), 3: (shard, shard, 2 * shard + ADAMW_SCALAR_BYTES)}
    for stage, (params, grads, opt_state) in expected.items():
        memory = result.stages[stage]
        assert (memory.params, memory.grads, memory.opt_state) == (params, grads, opt_state), stage


def test_flops_and_step_time_follow_the_config(llama_8b):
    config, result = llama_8b
    m, seq_len = config.model, config.data.seq_len
    _, matmul_weights = llama_8b_by_hand(config)
    # 6 FLOPs per weight per token (forward + backward), causal attention over (T + 1) / 2 keys per query.
    flops_per_token = 6 * matmul_weights + 3 * 4 * m.num_layers * m.d_model * (seq_len + 1) / 2
    tokens = config.data.batch_size * seq_len
    assert result.flops_per_step == pytest.approx(flops_per_token * tokens, rel=1e-9)
    assert result.step_time == pytest.approx(flops_per_token * tokens / (64 * 989.4e12 * 0.4), rel=1e-9)


def test_warns_when_the_total_exceeds_device_memory(llama_8b):
    config, result = llama_8b
    # As shipped (8 micro-batches) llama_8b fits an H100; in one micro-batch, 8 rows of 8192 tokens per device with
    # every projection output kept (dots_no_batch) are far beyond 80 GiB.
    assert result.fits
    assert "WARNING" not in preflight.report(config, result)
    whole = lm_config.load("configs/llama_8b.py", **{"optim.microbatches": 1})
    too_big = preflight.estimate(whole, FSDP_64, device="h100")
    assert not too_big.fits and result.total < too_big.total / 5
    assert "WARNING" in preflight.report(whole, too_big)


@pytest.mark.parametrize("policy", ["none", "full", "dots", "dots_no_batch"])
def test_activation_estimate_matches_what_jax_saves_for_the_backward_pass(policy):
    """The analytic 'kept for the backward pass' term against the residuals JAX's autodiff actually saves."""
    try:
        from jax._src.ad_checkpoint import saved_residuals
    except ImportError:
        pytest.skip("this JAX has no saved_residuals")
    batch, seq_len = 2, 64
    config = lm_config.load("configs/tiny.py", **{
        "model.remat_policy": policy, "model.dtype": "bfloat16", "model.attention": "xla", "model.num_layers": 3,
        "data.batch_size": batch, "data.seq_len": seq_len})
    model = model_lib.build(config)
    params = nn.unbox(jax.eval_shape(lambda: model_lib.init(model, jax.random.key(0))))
    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    residuals = saved_residuals(lambda p, t: model.apply({"params": p}, t), params, tokens)
    saved = sum(int(np.prod(aval.shape)) * aval.dtype.itemsize for aval, why in residuals if "argument" not in why)
    estimated = preflight.activation_bytes(config, {"data": 1, "fsdp": 1, "tensor": 1}, "xla")
    kept = estimated["layers, kept for the backward pass"]
    print(f"{policy}: JAX saves {saved:,} bytes, the estimate keeps {kept:,}")
    assert kept == pytest.approx(saved, rel=0.1)


def test_mesh_and_device_arguments_fail_in_one_line():
    assert dict(preflight.parse_mesh("fsdp=64")) == FSDP_64
    for text, message in [("data=2,fsdp=x", "must be an integer"), ("model=2", "names no mesh axis"),
                          ("data=2,data=2", "repeats")]:
        with pytest.raises(preflight.PreflightError, match=message) as error:
            preflight.parse_mesh(text)
        assert "\n" not in str(error.value)
    assert preflight.device_kind("TPU-v5e") == "TPU v5 lite"
    assert preflight.device_kind("A100_80GB") == "NVIDIA A100-SXM4-80GB"
    with pytest.raises(preflight.PreflightError, match="--device='b200' is not one of h100"):
        preflight.device_kind("b200")
    config = lm_config.load("configs/tiny.py")
    with pytest.raises(preflight.PreflightError, match="fsdp=-1.*--devices"):
        preflight.mesh_sizes(config.mesh)
    assert preflight.mesh_sizes(config.mesh, 8) == {"data": 1, "fsdp": 8, "expert": 1, "tensor": 1}
    with pytest.raises(lm_config.ConfigError, match="divisible by the data-parallel size"):
        preflight.estimate(config, {"data": 3, "fsdp": 1, "tensor": 1})


def run_cli(*args):
    # One CPU device, as on a laptop: the pre-flight must not need the target's devices, real or simulated.
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": ""}
    return subprocess.run([sys.executable, "-m", "lm.preflight", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_cli_reports_llama_8b_on_64_h100s_from_one_cpu_device():
    run = run_cli("--config=configs/llama_8b.py", "--mesh=data=1,fsdp=64,tensor=1", "--device=h100", "--mfu=0.4")
    print(run.stdout)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert "parameters: 8,030,261,248 (8.03 B)" in lines
    assert "  parameters            0.502" in lines
    assert "  gradients             0.502" in lines
    assert "  optimizer state       1.004" in lines
    assert any(line.startswith("step time at 40% MFU: ") for line in lines)
    assert not any(line.startswith("WARNING") for line in lines)
    one_micro_batch = run_cli("--config=configs/llama_8b.py", "--mesh=data=1,fsdp=64,tensor=1", "--device=h100",
                              "--config.optim.microbatches=1")
    assert one_micro_batch.stdout.splitlines()[-1].startswith("WARNING: ")


def test_cli_rejects_a_bad_mesh_in_one_line():
    run = run_cli("--config=configs/tiny.py", "--mesh=data=2,fsdp=many")
    assert run.returncode != 0
    assert run.stderr.strip().splitlines()[-1] == (
        "error: --mesh='data=2,fsdp=many': the size of fsdp must be an integer, got 'many'")


def small_config(layers: int = 2):
    config = lm_config.load("configs/tiny.py")
    m = config.model
    m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.mlp_dim, m.vocab_size = layers, 64, 4, 2, 128, 512
    config.data.seq_len, config.data.batch_size = 32, 8
    return config


def test_the_compiled_step_takes_the_estimated_state_as_its_arguments():
    """XLA's own figure for the arguments of the train step on a (2, 4) ZeRO-3 mesh of the 8 simulated devices is
    the estimate's exact train state plus this device's rows of the batch (and the step counter)."""
    config = small_config()
    config.sharding.zero_stage = 3
    sizes = {"data": 2, "fsdp": 4, "tensor": 1}
    estimate = preflight.estimate(config, sizes)
    compiled = preflight.compiled_memory(config, sizes)
    assert (compiled.backend, compiled.devices) == ("cpu", 8)
    batch_bytes = 5 * 4 * config.data.batch_size * config.data.seq_len // 8  # five int32/fp32 features
    state_bytes = estimate.state.params + estimate.state.opt_state
    assert abs(compiled.arguments - (state_bytes + batch_bytes)) <= 8, (compiled, state_bytes, batch_bytes)
    assert abs(compiled.aliased - state_bytes) <= 8  # The donated state is updated in place.
    assert compiled.temporaries > 0 and compiled.total < 4 * (state_bytes + batch_bytes + compiled.temporaries)
    with pytest.raises(preflight.PreflightError, match="--compile needs the 16 devices of the mesh"):
        preflight.compiled_memory(config, {"data": 4, "fsdp": 4, "tensor": 1})


def test_compile_time_does_not_grow_with_depth():
    """Scanned layers: the train step of 32 layers compiles in at most 1.5x the time of 2 (best of two each,
    alternating, after a warm-up compile); unrolled, 32 layers take about 3x."""
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}

    def seconds(layers: int) -> float:
        start = time.perf_counter()
        preflight.compiled_memory(small_config(layers), sizes)
        return time.perf_counter() - start

    seconds(3)
    times = {2: [], 32: []}
    for _ in range(2):
        for layers in times:
            times[layers].append(seconds(layers))
    assert min(times[32]) <= 1.5 * min(times[2]), times


def test_cli_compiles_the_step_on_this_machines_devices_with_compile():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-m", "lm.preflight", "--config=configs/tiny.py", "--mesh=data=1,fsdp=2",
                          "--config.model.num_layers=1", "--compile"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert "compiled on 2 x cpu (this machine's backend), per device (GB):" in lines
    assert any(line.startswith("  total ") and "estimate" in line for line in lines)
