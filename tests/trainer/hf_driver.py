"""Under torchrun: load checkpoints through the trainer's own path and dump megatron's logits.

    torchrun --nproc-per-node N tests/trainer/hf_driver.py JOBS.json

JOBS.json: `{"out": DIR, "tokens": [[...]], "greedy": {"prompt": [...], "steps": K} | null,
"jobs": {"name": {"config": model.yaml, "checkpoint": CKPT, "set": ["parallel.tp=2", ...]}}}`.
Each job builds the model with `trainer.model.build_gpt_chunks`, loads `checkpoint` with
`trainer.checkpoint.load_weights` (what `init.checkpoint` does), runs the tokens through megatron's
pipeline schedule (forward only) and writes `DIR/<name>.pt`: the full-vocabulary logits
(TP-gathered, padding sliced off) and, when asked, a greedy continuation computed by re-running
the same forward on the growing sequence.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region  # noqa: E402

from kiln.log import setup_logging  # noqa: E402
from tensor_parallel import runtime  # noqa: E402
from trainer.checkpoint import load_weights, resolve  # noqa: E402
from trainer.config import load_run_config  # noqa: E402
from trainer.model import build_gpt_chunks, padded_vocab_size  # noqa: E402


def forward(chunks: list, tokens: torch.Tensor, vocab: int) -> torch.Tensor | None:
    """Logits [b, s, vocab] on the last pipeline stage (None elsewhere)."""
    b, s = tokens.shape
    batch = {"tokens": tokens, "position_ids": torch.arange(s).expand(b, s)}

    def step(data_iterator, model):
        data = next(data_iterator)
        out = model(input_ids=data["tokens"], position_ids=data["position_ids"],
                    attention_mask=None)

        def collect(output):
            logits = gather_from_tensor_model_parallel_region(output)[..., :vocab]
            return output.sum() * 0, torch.tensor(1), {"logits": logits.detach().clone()}
        return out, collect

    iterators = [iter([batch]) for _ in chunks]
    with torch.no_grad():
        reports = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iterators if len(chunks) > 1 else iterators[0],
            model=chunks, num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=True)
    return reports[0]["logits"] if runtime.is_last_stage() else None


def greedy(chunks: list, prompt: list[int], steps: int, vocab: int) -> list[int] | None:
    """Argmax continuation, every step a full forward of the sequence so far."""
    seq = list(prompt)
    for _ in range(steps):
        logits = forward(chunks, torch.tensor([seq]), vocab)
        nxt = [int(logits[0, -1].argmax())] if logits is not None else [0]
        seq.append(int(runtime.broadcast_from_last_rank(nxt)[0]))
    return seq[len(prompt):] if runtime.is_last_stage() else None


def main() -> None:
    setup_logging("WARNING")
    with open(sys.argv[1], encoding="utf-8") as f:
        spec = json.load(f)
    tokens = torch.tensor(spec["tokens"])
    for name, job in spec["jobs"].items():
        cfg = load_run_config(job["config"], [*job.get("set", []), "checkpoint.save=false"])
        p = cfg.parallel
        runtime.init(tp=p.tp, pp=p.pp, vpp=p.vpp, cp=p.cp, seed=cfg.train.seed)
        vocab = cfg.model.vocab_size
        chunks = build_gpt_chunks(cfg, padded_vocab_size(vocab, cfg.model.make_vocab_size_divisible_by,
                                                         p.tp))
        load_weights(chunks, resolve(job["checkpoint"]))
        for chunk in chunks:
            chunk.eval()
        result = {"logits": forward(chunks, tokens, vocab)}
        if spec.get("greedy"):
            result["greedy"] = greedy(chunks, spec["greedy"]["prompt"], spec["greedy"]["steps"],
                                      vocab)
        if runtime.is_last_stage() and runtime.tp_rank() == 0 and runtime.dp_rank() == 0:
            torch.save(result, os.path.join(spec["out"], f"{name}.pt"))
        runtime.shutdown(keep_process_group=True)
    runtime.shutdown()


if __name__ == "__main__":
    main()
