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
        (MSAConfig, "local_blocks", 0),
        (MSAConfig, "local_blocks", 17),  # more than top_k (16)
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
    assert (msa.block_size, msa.top_k, msa.index_dim, msa.sink_blocks, msa.local_blocks) == (128, 16, 128, 0, 1)
    assert msa.dense_span == 2048
    with pytest.raises(dataclasses.FrozenInstanceError):
        msa.top_k = 4


def test_msa_layers_follow_n_dense_layers():
    cfg = ModelConfig(attention="msa", n_layers=5, n_dense_layers=2)
    assert [cfg.is_msa_layer(i) for i in range(5)] == [False, False, True, True, True]
    assert cfg.n_msa_layers == 3
    assert ModelConfig(attention="dense", n_layers=3).n_msa_layers == 0


def test_run_config_round_trips_and_validates():
    from msa_jax.config import RunConfig
    from msa_jax.presets import RUN_PRESETS, run_config

    for name in RUN_PRESETS:
        run = run_config(name)
        assert RunConfig.from_dict(run.to_dict()) == run
        mcfg, tcfg = run.model_config(), run.train_config()
        assert mcfg.attention == run.attention and tcfg.seq_len == run.seq_len
        assert mcfg.msa.warmup_steps == min(run.msa_warmup_steps, run.steps)
        if name != "tiny":  # every preset but the smoke-test one is really sparse at its context
            assert mcfg.msa.dense_span < tcfg.seq_len
    assert run_config("tiny", steps=10).train_config().lr_warmup_steps == 1  # 5% of the steps, at least 1
    with pytest.raises(ValueError, match="preset"):
        run_config("huge")
    with pytest.raises(ValueError, match="unknown keys"):
        RunConfig.from_dict({**RunConfig().to_dict(), "typo": 1})
    assert RunConfig(attention="dense", init_from="runs/x").init_from == "runs/x"  # a next stage at another length
    with pytest.raises(ValueError, match="n_heads"):  # the model config's own checks run too
        RunConfig(n_heads=5, n_kv_heads=2)
    assert RunConfig(rope_theta=5e5).model_config().rope_theta == 5e5  # a longer stage may raise the base
    with pytest.raises(ValueError, match="rope_theta"):
        RunConfig(rope_theta=0.0)
    # a run directory written before the field existed loads with the old fixed base
    assert RunConfig.from_dict({k: v for k, v in RunConfig().to_dict().items() if k != "rope_theta"}).rope_theta == 1e4
    a, b = RunConfig(), RunConfig(steps=7, d_model=32)
    assert a.differences(b) == ["steps", "d_model"] and "steps" in RunConfig.RESUMABLE
