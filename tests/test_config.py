"""Config files load, overrides apply, and every invalid config fails with a one-line error naming the field."""

import glob

import pytest

from lm import config as lm_config

CONFIG_FILES = sorted(glob.glob("configs/*.py"))


def test_config_directory_is_found():
    assert {"configs/tiny.py", "configs/gpt2_124m.py", "configs/llama_1b.py", "configs/llama_8b.py"} <= set(
        CONFIG_FILES)


@pytest.mark.parametrize("path", CONFIG_FILES)
def test_shipped_configs_are_valid(path):
    lm_config.validate(lm_config.load(path))


def test_overrides_apply_like_the_command_line():
    config = lm_config.load("configs/tiny.py", **{"model.num_layers": 2, "data.batch_size": 4})
    assert config.model.num_layers == 2 and config.data.batch_size == 4
    with pytest.raises(lm_config.ConfigError, match=r"config\.model\.num_layer is not a config field"):
        lm_config.load("configs/tiny.py", **{"model.num_layer": 2})


def test_missing_config_file_is_named():
    with pytest.raises(lm_config.ConfigError, match="configs/nope.py"):
        lm_config.load("configs/nope.py")


INVALID = [
    ({"model.d_model": 100, "model.num_heads": 3}, r"config\.model\.d_model=100 must be divisible by "
                                                   r"config\.model\.num_heads=3"),
    ({"model.num_heads": 4, "model.num_kv_heads": 3}, r"config\.model\.num_heads=4 must be divisible by "
                                                      r"config\.model\.num_kv_heads=3"),
    ({"model.d_model": 12, "model.num_heads": 4, "model.num_kv_heads": 4}, r"'rope' needs an even head dimension"),
    ({"model.num_layers": 0}, r"config\.model\.num_layers must be a positive integer, got 0"),
    ({"model.vocab_size": -5}, r"config\.model\.vocab_size must be a positive integer"),
    ({"data.batch_size": 0}, r"config\.data\.batch_size must be a positive integer"),
    ({"loss.chunk_size": 0}, r"config\.loss\.chunk_size must be a positive integer"),
    ({"model.norm": "batchnorm"}, r"config\.model\.norm='batchnorm' is not one of rmsnorm, layernorm"),
    ({"model.position_embedding": "rotary"}, r"config\.model\.position_embedding='rotary' is not one of"),
    ({"model.mlp_activation": "relu"}, r"config\.model\.mlp_activation='relu' is not one of"),
    ({"model.attention": "flash"}, r"config\.model\.attention='flash' is not one of"),
    ({"model.remat_policy": "some"}, r"config\.model\.remat_policy='some' is not one of"),
    ({"model.dtype": "fp8"}, r"config\.model\.dtype='fp8' is not one of"),
    ({"data.source": "web"}, r"config\.data\.source='web' is not one of"),
    ({"model.max_seq_len": 64, "data.seq_len": 128}, r"config\.model\.max_seq_len=64 is below the training length "
                                                     r"config\.data\.seq_len=128"),
    ({"sharding.zero_stage": 4}, r"config\.sharding\.zero_stage=4 is not one of 0, 1, 2, 3"),
    ({"model.rope_theta": 0.0}, r"config\.model\.rope_theta must be a finite number > 0, got 0.0"),
    ({"optim.learning_rate": float("nan")}, r"config\.optim\.learning_rate must be a finite number > 0, got nan"),
    ({"optim.learning_rate": -1e-3}, r"config\.optim\.learning_rate must be a finite number > 0"),
    ({"keep_checkpoints": 0}, r"config\.keep_checkpoints must be a positive integer, got 0"),
    ({"eval_every": 0}, r"config\.eval_every must be a positive integer, got 0"),
    ({"optim.warmup_steps": -1}, r"config\.optim\.warmup_steps must be an integer >= 0"),
    ({"loss.label_smoothing": 1.0}, r"config\.loss\.label_smoothing must be a finite number in \[0, 1\)"),
    ({"model.logit_softcap": 0.0}, r"config\.model\.logit_softcap must be None or positive"),
    ({"eval_steps": 0}, r"config\.eval_steps must be a positive integer or -1 \(the whole split\), got 0"),
    ({"eval_steps": -2}, r"config\.eval_steps must be a positive integer or -1"),
]


@pytest.mark.parametrize("overrides,message", INVALID, ids=[",".join(o) for o, _ in INVALID])
def test_invalid_config_raises_one_line_error_naming_the_field(overrides, message):
    config = lm_config.load("configs/tiny.py", **overrides)
    with pytest.raises(lm_config.ConfigError, match=message) as error:
        lm_config.validate(config)
    assert "\n" not in str(error.value)


def test_workdir_config_round_trips_through_config_json(tmp_path):
    config = lm_config.load("configs/tiny.py", **{"model.num_layers": 2, "model.logit_softcap": 30.0})
    lm_config.write_config(str(tmp_path), config)
    read = lm_config.read_config(str(tmp_path))
    assert read.to_dict() == config.to_dict()
    assert isinstance(read.sharding.logical_axis_rules, tuple)
    lm_config.check_same_model(str(tmp_path), config)
    config.model.d_model = 128
    with pytest.raises(lm_config.CheckpointError, match=r"another model \(config\.model d_model: 256 in the workdir, 128 now"):
        lm_config.check_same_model(str(tmp_path), config)
    with pytest.raises(lm_config.CheckpointError, match="is not an lm workdir"):
        lm_config.read_config(str(tmp_path / "missing"))
