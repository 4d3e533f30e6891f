"""Rule rewards, loading a user's reward function from the config, and the RL stages' refusals
of configurations they cannot run (each names the key)."""

from __future__ import annotations

import pytest

from kiln.errors import ConfigError
from tests.trainer.conftest import ROOT
from trainer.rewards import (
    call_reward_function,
    check_reward_arguments,
    exact_match,
    id_range_fraction,
    load_reward_function,
    token_fraction,
)

PPO = str(ROOT / "trainer" / "configs" / "tiny-ppo.yaml")
GRPO = str(ROOT / "trainer" / "configs" / "tiny-grpo.yaml")
SFT = str(ROOT / "trainer" / "configs" / "tiny-sft.yaml")
RM = str(ROOT / "trainer" / "configs" / "tiny-rm.yaml")


def test_rule_rewards():
    ids = [[5, 9, 5, 3], [], [70, 71, 72]]
    assert token_fraction(completion_ids=ids, token_ids=[5, 3]) == [0.75, 0.0, 0.0]
    assert id_range_fraction(completion_ids=ids, low=8, high=72) == [0.25, 0.0, 2 / 3]
    assert exact_match(completions=[" 42\n", "41", None], references=["42", "42", "42"]) == [
        1.0, 0.0, 0.0]


def test_reward_function_from_module_and_name():
    fn = load_reward_function("trainer.rewards:token_fraction", "grpo.reward_function")
    assert fn is token_fraction
    with pytest.raises(ConfigError, match="grpo.reward_function.*module:function"):
        load_reward_function("trainer.rewards.token_fraction", "grpo.reward_function")
    with pytest.raises(ConfigError, match="cannot import 'no_such_module'"):
        load_reward_function("no_such_module:f", "grpo.reward_function")
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        load_reward_function("trainer.rewards:nope", "grpo.reward_function")


def test_reward_function_results_are_checked():
    key = "ppo.reward_function"
    assert call_reward_function(lambda **_: (1, 0.5), 2, key) == [1.0, 0.5]
    with pytest.raises(ConfigError, match="returned 1 values for 2 completions"):
        call_reward_function(lambda **_: [1.0], 2, key)
    with pytest.raises(ConfigError, match="NaN or infinite"):
        call_reward_function(lambda **_: [1.0, float("nan")], 2, key)
    with pytest.raises(ConfigError, match="expected a list of floats"):
        call_reward_function(lambda **_: ["a", "b"], 2, key)


def test_reward_arguments_are_checked_against_the_function():
    key = "grpo.reward_kwargs"
    check_reward_arguments(id_range_fraction, {"low": 1, "high": 2}, key)
    check_reward_arguments(exact_match, {"unused": 1}, key)  # `**_` takes the rest
    with pytest.raises(ConfigError, match="missing a required argument: 'high'"):
        check_reward_arguments(id_range_fraction, {"low": 1}, key)

    def strict(*, prompts, completions, prompt_ids, completion_ids, references):
        return []

    check_reward_arguments(strict, {}, key)
    with pytest.raises(ConfigError, match="unexpected keyword argument 'x'"):
        check_reward_arguments(strict, {"x": 1}, key)


@pytest.mark.parametrize(("config", "override", "key"), [
    (PPO, "ppo.reward_function=null", "ppo.reward_function"),
    (GRPO, "train.global_batch_size=12", "train.global_batch_size"),
    (GRPO, "grpo.samples_per_prompt=1", "grpo.samples_per_prompt"),
    (GRPO, "grpo.loss_type=sum", "grpo.loss_type"),
    (PPO, "ppo.top_p=0", "ppo.top_p"),
    (PPO, "train.seq_length=16", "train.seq_length"),
    (GRPO, "data.split=1,99,0", "grpo.prompts_per_rollout"),
    # a split smaller than a global batch: at start, not at the last validation
    (SFT, "data.split=99,1,0", "data.split"),
    (SFT, "data.split=0,100,0", "data.split"),
    (RM, "rm.use_margin=true", "rm.use_margin"),  # the sample pairs carry no margins
    # a rule checking answers on prompts that have none: every reward the same
    (GRPO, "grpo.reward_function=trainer.rewards:exact_match", "grpo.reward_function"),
    # a rule's own arguments, checked before any model is built
    (GRPO, "grpo.reward_kwargs={}", "grpo.reward_kwargs"),
    (GRPO, 'grpo.reward_kwargs={"low":1,"high":2,"prompts":3}', "grpo.reward_kwargs"),
])
def test_stages_refuse_what_they_cannot_run(config, override, key):
    from trainer.config import load_run_config
    from trainer.stages import stage_class

    with pytest.raises(ConfigError, match=f"'{key}'"):
        cfg = load_run_config(config, override.split())
        stage_class(cfg.stage)(cfg).setup()
