"""How tensors are split across ranks: the runtime (process groups over megatron's parallel
state), the CPU backend for machines without CUDA, and layout validation.

Stages use `tensor_parallel.runtime` (rank info, `dp_all_reduce`, `is_last_stage`...) and never
call `torch.distributed` themselves.
"""

from tensor_parallel.cpu_backend import SequenceParallelTorchNorm
from tensor_parallel.layout import Layout, check_model_fits, infer_layout, micro_batches_per_step

__all__ = ["Layout", "SequenceParallelTorchNorm", "check_model_fits", "infer_layout",
           "micro_batches_per_step"]
