"""ModelConfig: presets, overrides, validation with one clear sentence, and the dict round trip."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given
from strategies import model_configs

from tinygpt import PRESETS, ModelConfig


def test_seed_preset_is_the_seed_model():
    config = ModelConfig.preset("seed")
    assert (config.vocab_size, config.d_model, config.n_heads, config.n_layers, config.d_ff,
            config.max_seq) == (40, 32, 4, 2, 64, 32)
    assert (config.norm_first, config.activation, config.seed_input_scale) == (False, "relu", True)
    assert config.d_head == 8


@pytest.mark.parametrize("name, sizes", [
    ("shakespeare-cpu", (4, 4, 128, 64)),
    ("baby", (6, 6, 384, 256)),
])
def test_larger_presets(name, sizes):
    config = ModelConfig.preset(name)
    assert (config.n_layers, config.n_heads, config.d_model, config.max_seq) == sizes
    assert not config.seed_input_scale, "only the seed preset turns the seed quirk on"


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_takes_the_documented_overrides(name):
    config = ModelConfig.preset(name, norm_first=True, activation="gelu", dropout=0.1, vocab_size=7)
    assert (config.norm_first, config.activation, config.dropout, config.vocab_size) == (
        True, "gelu", 0.1, 7)
    config = ModelConfig.preset(name, norm_first=False, activation="relu", dropout=0.0)
    assert (config.norm_first, config.activation, config.dropout) == (False, "relu", 0.0)


BAD_FIELDS = [
    ({"vocab_size": 0}, "vocab_size must be a positive integer, got 0."),
    ({"d_model": -32}, "d_model must be a positive integer, got -32."),
    ({"n_heads": 2.0}, "n_heads must be a positive integer, got 2.0."),
    ({"n_layers": True}, "n_layers must be a positive integer, got True."),
    ({"d_ff": "64"}, "d_ff must be a positive integer, got '64'."),
    ({"max_seq": 0}, "max_seq must be a positive integer, got 0."),
    ({"n_heads": 5}, "d_model (32) must be divisible by n_heads (5)."),
    ({"dropout": 1.0}, "dropout must be in [0, 1), got 1.0."),
    ({"dropout": -0.1}, "dropout must be in [0, 1), got -0.1."),
    ({"dropout": "0.1"}, "dropout must be in [0, 1), got '0.1'."),
    ({"activation": "tanh"}, "activation must be one of relu, gelu, gelu_tanh, got 'tanh'."),
]


@pytest.mark.parametrize("override, message", BAD_FIELDS, ids=[str(o) for o, _ in BAD_FIELDS])
def test_bad_field_raises_one_sentence_naming_it(override, message):
    with pytest.raises(ValueError) as error:
        ModelConfig.preset("seed", **override)
    assert str(error.value) == message


def test_unknown_preset_and_unknown_field_are_named():
    with pytest.raises(ValueError, match=r"unknown preset 'tiny'; choose one of seed, "):
        ModelConfig.preset("tiny")
    with pytest.raises(ValueError, match=r"unknown config field 'n_head'; known fields: "):
        ModelConfig.preset("seed", n_head=4)


@given(config=model_configs())
def test_dict_round_trip(config):
    """A checkpoint stores the config as a plain dict (JSON: None is an unset window or
    key/value head count); it comes back equal, through JSON too."""
    values = config.to_dict()
    assert all(isinstance(v, (int, float, str, bool, type(None))) for v in values.values())
    assert ModelConfig.from_dict(values) == config
    assert ModelConfig.from_dict(json.loads(json.dumps(values))) == config
    assert config.d_head * config.n_heads == config.d_model


def test_config_is_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ModelConfig.preset("seed").d_model = 64
