"""The one config system: typed dataclasses from YAML with --set overrides, errors name the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from kiln.config import dump_yaml, load_config
from kiln.errors import ConfigError


@dataclass
class Optim:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    kind: Literal["adam", "sgd"] = "adam"


@dataclass
class Cfg:
    steps: int = 10
    name: str = "run"
    resume: bool = False
    init: str | None = None
    optimizer: Optim = field(default_factory=Optim)
    weights: dict[str, float] = field(default_factory=dict)


def test_yaml_and_overrides_build_typed_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 5\noptimizer:\n  lr: 3e-4\n  kind: sgd\nweights: {a: 1}\n")
    cfg = load_config(Cfg, path, ["optimizer.lr=1e-2", "name=x", "resume=true"])
    assert cfg.steps == 5 and cfg.optimizer.lr == 0.01 and cfg.optimizer.kind == "sgd"
    assert cfg.name == "x" and cfg.resume is True and cfg.weights == {"a": 1.0}
    assert load_config(Cfg, None, ["init=null"]).init is None
    assert "lr: 0.01" in dump_yaml(cfg)


@pytest.mark.parametrize("override,key,words", [
    (["optimizer.lrr=1"], "optimizer.lrr", "unknown key"),
    (["steps=ten"], "steps", "expected an integer"),
    (["resume=3"], "resume", "true or false"),
    (["optimizer.kind=rmsprop"], "optimizer.kind", "must be one of"),
    (["optimizer.betas=0.9"], "optimizer.betas", "expected a list"),
    (["optimizer.betas=[0.9, x]"], "optimizer.betas[1]", "expected a number"),
    (["steps.x=1"], "steps", "expected an integer"),
    (["novalue"], "novalue", "key.path=value"),
])
def test_bad_keys_and_types_name_the_key(override, key, words):
    with pytest.raises(ConfigError) as info:
        load_config(Cfg, None, override)
    assert f"'{key}'" in str(info.value) and words in str(info.value)
    assert info.value.exit_code == 2


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Cfg, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Cfg, bad)
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Cfg, tmp_path / "list.yaml")
