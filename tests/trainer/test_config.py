"""The run config: typed sections, overrides, stage sections, errors that name the key."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from kiln.errors import ConfigError
from trainer.config import RunConfig, load_run_config, run_config_class

CONFIGS = Path(__file__).resolve().parents[2] / "trainer" / "configs"


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
    ("train.profile_steps=[3,2]", "train.profile_steps"),
    ("train.profile_steps=[0,2]", "train.profile_steps"),
    ("train.profile_steps=[4]", "train.profile_steps"),
    ("train.exit_signals=[SIGKILL]", "train.exit_signals"),
    ("train.exit_signals=[SIGNOPE]", "train.exit_signals"),
    ("train.time_limit_minutes=0", "train.time_limit_minutes"),
    ("parallel.timeout_minutes=0", "parallel.timeout_minutes"),
    ("train.hang_dump_minutes=-1", "train.hang_dump_minutes"),
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


@pytest.mark.parametrize("name, world", [("llama-1b", 8), ("llama-8b", 32), ("llama-70b", 512)])
def test_cluster_configs_split_their_cluster(name: str, world: int) -> None:
    from tensor_parallel import check_model_fits, infer_layout, micro_batches_per_step

    cfg = load_run_config(str(CONFIGS / f"{name}.yaml"))
    p, m = cfg.parallel, cfg.model
    layout = infer_layout(world, p.tp, p.pp, p.vpp, p.cp)
    check_model_fits(layout, num_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                     num_query_groups=m.num_query_groups, seq_length=cfg.train.seq_length,
                     sequence_parallel=p.sequence_parallel)
    micro = micro_batches_per_step(layout, global_batch_size=cfg.train.global_batch_size,
                                   micro_batch_size=cfg.train.micro_batch_size)
    assert micro % p.pp == 0
    assert m.transformer_impl == "transformer_engine" and m.fp8 is not None


@pytest.mark.parametrize("overrides, key", [
    (["model.fp8=delayed"], "model.fp8"),
    (["model.transformer_impl=transformer_engine"], "model.transformer_impl"),
    (["parallel.cp=2", "model.local_attention=megatron"], "parallel.cp"),
])
def test_gpu_only_features_fail_at_startup_on_cpu(tiny_config: str, overrides: list[str],
                                                  key: str) -> None:
    import torch

    from trainer.model import check_model_config, have_transformer_engine

    if torch.cuda.is_available() or have_transformer_engine():
        pytest.skip("checks the CPU-only machine's startup errors")
    with pytest.raises(ConfigError) as err:
        check_model_config(load_run_config(tiny_config, overrides))
    assert err.value.key == key


def test_padded_vocab_does_not_depend_on_tp() -> None:
    from trainer.model import padded_vocab_size

    assert {padded_vocab_size(257, 128, tp) for tp in (1, 2, 4, 8)} == {384}
    assert padded_vocab_size(128256, 128, 8) == 128256


@pytest.mark.parametrize("fusions", ["true", "false"])
def test_gpu_local_spec_config_passes_megatron_validation(monkeypatch, fusions: str) -> None:
    """On a GPU without Transformer Engine (the local spec in bf16) megatron's own checks accept
    the config: its compiled SwiGLU, not `fused_ops.SwiGLU`, is the fused activation there."""
    from trainer import model

    monkeypatch.setattr(model.runtime, "on_gpu", lambda: True)
    cfg = load_run_config(str(CONFIGS / "llama-1b.yaml"), [
        "model.transformer_impl=local", "model.fp8=null", f"model.local_fusions={fusions}"])
    config = model.transformer_config(cfg)
    assert config.bias_activation_fusion and not config.use_te_activation_func


@pytest.mark.parametrize("stage, override, key", [
    ("dpo", "dpo.loss_type=sigmiod", "dpo.loss_type"),
    ("dpo", "dpo.beta=0", "dpo.beta"),
    ("dpo", "dpo.beta=.nan", "dpo.beta"),
    ("dpo", "dpo.loss_type=robust dpo.label_smoothing=0.5", "dpo.label_smoothing"),
    ("dpo", "dpo.loss_type=ipo dpo.label_smoothing=0.1", "dpo.label_smoothing"),
    ("dpo", "dpo.label_smoothing=1.5", "dpo.label_smoothing"),
    ("simpo", "simpo.beta=0", "simpo.beta"),
    ("orpo", "orpo.beta=-5", "orpo.beta"),
    ("kto", "kto.desirable_weight=-1", "kto.desirable_weight"),
    ("kto", "kto.desirable_weight=0 kto.undesirable_weight=0", "kto.desirable_weight"),
    ("rm", "rm.center_rewards_coefficient=-0.1", "rm.center_rewards_coefficient"),
    ("ppo", "ppo.clip_range=-0.5", "ppo.clip_range"),
    ("ppo", "ppo.lam=1.5", "ppo.lam"),
    ("ppo", "ppo.adaptive_kl=true ppo.kl_target=0", "ppo.kl_target"),
    ("ppo", "ppo.adaptive_kl=true ppo.kl_horizon=0", "ppo.kl_horizon"),
    ("grpo", "grpo.epsilon_low=1.5", "grpo.epsilon_low"),
    ("grpo", "grpo.beta=-0.1", "grpo.beta"),
])
def test_stage_options_out_of_range_name_their_key(stage, override, key) -> None:
    """Values the types allow but the loss cannot use: refused when the config loads, before
    a model is built or a reference pass runs."""
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_run_config(str(CONFIGS / f"tiny-{stage}.yaml"), override.split())


def test_stage_options_at_their_bounds_load() -> None:
    for stage, override in [("dpo", "dpo.loss_type=robust dpo.label_smoothing=0.49"),
                            ("dpo", "dpo.label_smoothing=0.5"), ("orpo", "orpo.beta=0"),
                            ("grpo", "grpo.beta=0"), ("ppo", "ppo.kl_coef=0 ppo.gamma=1"),
                            ("kto", "kto.undesirable_weight=0")]:
        load_run_config(str(CONFIGS / f"tiny-{stage}.yaml"), override.split())


def test_input_paths_are_saved_absolute(tmp_path: Path, monkeypatch) -> None:
    """Found from the working directory or the repository, then absolute: the config saved with
    each checkpoint works from anywhere (export-hf, generate, a later init.checkpoint)."""
    monkeypatch.chdir(tmp_path)
    cfg = load_run_config(str(CONFIGS / "tiny-sft.yaml"), ["init.checkpoint=ckpt"])
    assert cfg.data.manifests == [str(CONFIGS / "data" / "sample-sft")]
    assert cfg.sft.tokenizer == str(CONFIGS / "data" / "tokenizer-hh")
    assert cfg.init.checkpoint == "ckpt"  # not there: left for the trainer's own error
    (tmp_path / "ckpt").mkdir()
    cfg = load_run_config(str(CONFIGS / "tiny-sft.yaml"), ["init.checkpoint=ckpt",
                                                           "sft.tokenizer=0123abcd"])
    assert cfg.init.checkpoint == str(tmp_path / "ckpt") and cfg.sft.tokenizer == "0123abcd"
