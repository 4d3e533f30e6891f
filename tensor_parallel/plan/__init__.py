"""`kiln plan`: rank TP x PP (x VPP) x CP x DP layouts of a Llama-style model by estimated memory per GPU.

`memory` estimates what one GPU of each pipeline stage holds (parameters counted as megatron's
`GPTModel` holds them; activations tensor by tensor after Korthikanti et al. 2022), `ranking`
enumerates the layouts megatron accepts and orders them, `cli` prints them. The trainer calls
`estimate_memory` to log its planned memory at start.
"""

from tensor_parallel.plan.cli import load_model, main
from tensor_parallel.plan.memory import (
    NAMED_MODELS,
    Layout,
    MemoryEstimate,
    ModelShape,
    StageMemory,
    TrainingSetup,
    count_parameters,
    estimate_memory,
    stage_activations,
)
from tensor_parallel.plan.ranking import (
    Plan,
    context_parallel_sizes,
    plan_layouts,
    throughput_proxy,
)

__all__ = [
    "NAMED_MODELS", "Layout", "MemoryEstimate", "ModelShape", "Plan", "StageMemory",
    "TrainingSetup", "context_parallel_sizes", "count_parameters", "estimate_memory", "load_model", "main", "plan_layouts",
    "stage_activations", "throughput_proxy",
]
