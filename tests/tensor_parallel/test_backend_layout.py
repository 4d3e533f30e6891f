"""Layout validation: every impossible split is refused with the config key to change."""

from __future__ import annotations

import pytest

from kiln.errors import ConfigError
from tensor_parallel import Layout, check_model_fits, infer_layout, micro_batches_per_step


def test_data_parallel_is_what_remains() -> None:
    assert infer_layout(8, tp=2, pp=2, vpp=None, cp=1) == Layout(tp=2, pp=2, dp=2)
    assert infer_layout(4, tp=1, pp=2, vpp=2, cp=1).model_chunks == 2
    assert infer_layout(2, tp=1, pp=2, vpp=1, cp=1).vpp is None


@pytest.mark.parametrize("world, kwargs, key", [
    (3, dict(tp=2, pp=1, vpp=None, cp=1), "parallel.tp"),
    (2, dict(tp=1, pp=1, vpp=2, cp=1), "parallel.vpp"),
    (2, dict(tp=0, pp=1, vpp=None, cp=1), "parallel.tp"),
])
def test_impossible_world_splits(world: int, kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        infer_layout(world, **kwargs)
    assert err.value.key == key


MODEL = dict(num_layers=4, num_attention_heads=8, num_query_groups=2, seq_length=128,
             sequence_parallel=False)


@pytest.mark.parametrize("layout, change, key", [
    (Layout(tp=3), {}, "parallel.tp"),  # 8 heads % 3
    (Layout(tp=4), {}, "parallel.tp"),  # 2 KV heads % 4
    (Layout(pp=3), {}, "parallel.pp"),  # 4 layers % 3
    (Layout(pp=2, vpp=4), {}, "parallel.pp"),  # 4 layers % (2×4)
    (Layout(), {"sequence_parallel": True}, "parallel.sequence_parallel"),
    (Layout(tp=2), {"sequence_parallel": True, "seq_length": 127}, "train.seq_length"),
])
def test_model_must_split_evenly(layout: Layout, change: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_model_fits(layout, **{**MODEL, **change})
    assert err.value.key == key


def test_valid_model_split_passes() -> None:
    check_model_fits(Layout(tp=2, pp=2, vpp=2), **MODEL)


def test_global_batch_is_micro_times_dp_times_accumulation() -> None:
    assert micro_batches_per_step(Layout(dp=2), global_batch_size=16, micro_batch_size=2) == 4
    with pytest.raises(ConfigError) as err:
        micro_batches_per_step(Layout(dp=3), global_batch_size=16, micro_batch_size=2)
    assert err.value.key == "train.global_batch_size"


def test_interleaved_pipelining_needs_whole_groups_of_pp_micro_batches() -> None:
    layout = Layout(pp=2, vpp=2)
    assert micro_batches_per_step(layout, global_batch_size=8, micro_batch_size=2) == 4
    # megatron's own error for this comes from inside its schedule, after the model is built
    with pytest.raises(ConfigError, match="3 micro-batches.*multiple of pp=2") as err:
        micro_batches_per_step(layout, global_batch_size=6, micro_batch_size=2)
    assert err.value.key == "train.global_batch_size"
    assert micro_batches_per_step(Layout(pp=2), global_batch_size=6, micro_batch_size=2) == 3
