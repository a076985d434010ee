"""Configs are frozen and reject bad values with a ValueError that names the field."""

import dataclasses

import pytest

from msa_jax.config import MSAConfig, ModelConfig, TrainConfig


@pytest.mark.parametrize(
    "cls, field, value",
    [
        (MSAConfig, "block_size", 0),
        (MSAConfig, "top_k", 0),
        (MSAConfig, "index_dim", -4),
        (MSAConfig, "sink_blocks", -1),
        (MSAConfig, "kl_weight", -1.0),
        (MSAConfig, "warmup_steps", 1.5),
        (ModelConfig, "attention", "sparse"),
        (ModelConfig, "n_heads", 6),  # not a multiple of n_kv_heads=4
        (ModelConfig, "impl", "cuda"),
        (ModelConfig, "rope_fraction", 0.0),
        (ModelConfig, "dtype", "float16"),
        (TrainConfig, "learning_rate", 0.0),
        (TrainConfig, "steps", 0),
        (TrainConfig, "b2", 1.0),
    ],
)
def test_bad_values_raise_naming_the_field(cls, field, value):
    kwargs = {field: value}
    if cls is ModelConfig and field == "n_heads":
        kwargs["n_kv_heads"] = 4
    with pytest.raises(ValueError, match=field):
        cls(**kwargs)


def test_configs_are_frozen_and_defaults_follow_the_paper():
    msa = MSAConfig()
    assert (msa.block_size, msa.top_k, msa.index_dim, msa.sink_blocks) == (128, 16, 128, 0)
    assert msa.dense_span == 2048
    with pytest.raises(dataclasses.FrozenInstanceError):
        msa.top_k = 4


def test_msa_layers_follow_n_dense_layers():
    cfg = ModelConfig(attention="msa", n_layers=5, n_dense_layers=2)
    assert [cfg.is_msa_layer(i) for i in range(5)] == [False, False, True, True, True]
    assert cfg.n_msa_layers == 3
    assert ModelConfig(attention="dense", n_layers=3).n_msa_layers == 0
