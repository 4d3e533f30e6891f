"""The run config: typed sections, overrides, stage sections, errors that name the key."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from kiln.errors import ConfigError
from trainer.config import RunConfig, load_run_config, run_config_class


def test_tiny_config_loads_with_overrides(tiny_config: str) -> None:
    cfg = load_run_config(tiny_config, ["parallel.tp=2", "train.steps=5", "optimizer.lr=1e-3"])
    assert isinstance(cfg, RunConfig)
    assert (cfg.parallel.tp, cfg.train.steps, cfg.optimizer.lr) == (2, 5, 1e-3)
    assert cfg.model.num_query_groups == 2 and cfg.stage == "pretrain"


@pytest.mark.parametrize("override, key", [
    ("model.hiden_size=3", "model.hiden_size"),
    ("train.steps=many", "train.steps"),
    ("model.fp8=fp4", "model.fp8"),
    ("parallel.sequence_parallel=maybe", "parallel.sequence_parallel"),
])
def test_bad_keys_are_named(tiny_config: str, override: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_run_config(tiny_config, [override])
    assert err.value.key == key


def test_unknown_stage_is_a_config_error(tiny_config: str) -> None:
    with pytest.raises(ConfigError, match="unknown stage 'nope'"):
        load_run_config(tiny_config, ["stage=nope"])


def test_stage_section_is_added_without_touching_run_config() -> None:
    @dataclass
    class DemoOptions:
        beta: float = 0.1

    cls = run_config_class(DemoOptions, "demo")
    from kiln.config import load_config

    cfg = load_config(cls, None, ["demo.beta=0.5", "train.steps=3"])
    assert cfg.demo.beta == 0.5 and cfg.train.steps == 3
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, None, ["demo.beta=0.5"])
    assert err.value.key == "demo"
