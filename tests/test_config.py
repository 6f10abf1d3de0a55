"""Model config validation: every bad config is one ConfigError naming the field."""

import glob

import pytest

from mesh_megatron.config import ConfigError, ModelConfig

TINY = dict(arch="mesh", hidden_size=64, num_attention_heads=4, prelude_layers=1, core_layers=2, num_loops=2, coda_layers=1)


@pytest.mark.parametrize("path", sorted(glob.glob("configs/*.yaml")))
def test_shipped_configs_load(path):
    cfg = ModelConfig.from_yaml(path)
    assert cfg.name and cfg.name in path


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(hidden_size=66), "hidden_size"),
        (dict(arch="meshh"), "arch"),
        (dict(num_loops=0), "num_loops"),
        (dict(arch="recursive", connection="anker"), "connection"),
        (dict(mesh_slots=1), "mesh_slots"),
        (dict(num_layers=4), "num_layers"),
    ],
)
def test_bad_values_name_the_field(change, field):
    with pytest.raises(ConfigError, match=rf"model\.{field}"):
        ModelConfig.from_dict({**TINY, **change})


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"model\.hiden_size.*did you mean 'hidden_size'"):
        ModelConfig.from_dict({**TINY, "hiden_size": 64})


def test_missing_field_is_named():
    d = dict(TINY)
    del d["hidden_size"]
    with pytest.raises(ConfigError, match=r"missing required field 'model\.hidden_size'"):
        ModelConfig.from_dict(d)


def test_heads_not_divisible_by_tp():
    cfg = ModelConfig.from_dict({**TINY, "num_attention_heads": 2, "hidden_size": 64})
    with pytest.raises(ConfigError, match=r"model\.num_attention_heads.*tensor parallel size 4"):
        cfg.validate_parallel(4)


def test_buffer_default_is_k_plus_3():
    assert ModelConfig.from_dict(TINY).num_slots == 5
    assert ModelConfig.from_dict({**TINY, "num_loops": 3}).num_slots == 6
