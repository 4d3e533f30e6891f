"""Forward passes outside the training step: a micro-batch onto this rank's device (cut for
context parallelism), and `forward_only`, which runs model chunks without gradients through
megatron's pipeline schedules (reference and reward scoring, evaluation, generation)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.pipeline_parallel.schedules import get_tensor_shapes
from megatron.core.utils import get_attr_wrapped_model, get_batch_on_this_cp_rank, get_model_config

from tensor_parallel import runtime
from trainer.stages import Batch


def on_device(batch: Batch) -> Batch:
    """The micro-batch on this rank's device, cut to this context-parallel rank's chunks (the
    per-token tensors `[b, s, ...]` and the attention mask's query rows; per-sample ones such as
    `index` stay whole)."""
    device = runtime.device()
    batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
             for k, v in batch.items()}
    if runtime.layout().cp == 1:
        return batch
    seq = batch["tokens"].shape[1]
    per_token = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and (
        k == "attention_mask" or (v.dim() >= 2 and v.shape[1] == seq))}
    return batch | get_batch_on_this_cp_rank(per_token)


def forward_only(model: list[torch.nn.Module], batches: Callable[[], Iterator[Batch]],
                 num_micro: int, forward: Callable[[torch.nn.Module, Batch], torch.Tensor],
                 collect: Callable[[torch.Tensor, Batch], Any], *, seq_length: int,
                 micro_batch_size: int) -> list[Any]:
    """Run model chunks (e.g. a frozen reference model) over `num_micro` micro-batches through
    the pipeline schedule without gradients.

    `batches()` makes one micro-batch iterator (called once per model chunk); `forward` as in
    `Stage.forward`; on the last pipeline stage the result is `[collect(output, batch), ...]`
    per micro-batch, elsewhere `[]`. DPO-style stages use it for reference log-probs.

    Several chunks per rank (virtual pipeline stages) take megatron's interleaved schedule, which
    needs a whole multiple of PP micro-batches; other counts (a decoding step is one micro-batch)
    run each micro-batch through the chunks in turn (`_forward_in_turn`).
    """
    if len(model) > 1 and num_micro % runtime.layout().pp:
        return _forward_in_turn(model, batches(), num_micro, forward, collect,
                                seq_length=seq_length, micro_batch_size=micro_batch_size)

    def step(data_iterator, chunk):
        batch = on_device(next(data_iterator))
        return forward(chunk, batch), lambda output, non_loss_data=True: collect(output, batch)

    iterators = [batches() for _ in model]
    with torch.no_grad():
        return get_forward_backward_func()(
            forward_step_func=step, data_iterator=iterators if len(model) > 1 else iterators[0],
            model=model, num_microbatches=num_micro, seq_length=seq_length,
            micro_batch_size=micro_batch_size, forward_only=True, collect_non_loss_data=True)


@torch.no_grad()
def _forward_in_turn(model: list[torch.nn.Module], batches: Iterator[Batch], num_micro: int,
                     forward: Callable[[torch.nn.Module, Batch], torch.Tensor],
                     collect: Callable[[torch.Tensor, Batch], Any], *, seq_length: int,
                     micro_batch_size: int) -> list[Any]:
    """`forward_only` one micro-batch at a time: chunk v on every pipeline rank in order, then
    chunk v + 1 (the last rank's chunk v hands its activations round the ring to the first
    rank's chunk v + 1), which is the order of the model's layers under virtual pipelining.
    Nothing overlaps, so all ranks but one wait at each moment: for the few micro-batches the
    interleaved schedule refuses, not for throughput."""
    config = get_model_config(model[0])
    group = ps.get_pipeline_model_parallel_group()
    p2p = P2PCommunicator(pp_group=group, config=config)
    [shape] = get_tensor_shapes(seq_length=seq_length, micro_batch_size=micro_batch_size,
                                decoder_seq_length=None, config=config,
                                tp_group=ps.get_tensor_model_parallel_group(),
                                cp_group=ps.get_context_parallel_group())
    first_rank, last_rank = group.rank() == 0, group.rank() == group.size() - 1
    results = []
    for _ in range(num_micro):
        batch = on_device(next(batches))
        for v, chunk in enumerate(model):
            first, last = first_rank and v == 0, last_rank and v == len(model) - 1
            get_attr_wrapped_model(chunk, "set_input_tensor")(p2p.recv_forward(shape, first))
            output = forward(chunk, batch)
            if last:
                results.append(collect(output, batch))
            else:
                p2p.send_forward(output, is_last_stage=False)
    return results
