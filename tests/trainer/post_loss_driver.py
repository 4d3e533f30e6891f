"""Under torchrun with TP=2: every post-training stage's loss against `trainer.losses` applied to
log-probs computed independently, by `torch.log_softmax` over logits all-gathered across TP.

    torchrun --nproc-per-node 2 tests/trainer/post_loss_driver.py OUT.json

Per case: the reference log-probs the stage precomputed are checked against the independent ones
of the starting model; one optimizer step is taken (so policy and reference differ); then the
stage's loss on a fixed batch is compared with the independent loss. The packed-SFT case also
checks that each conversation of a packed row gets the log-probs it gets alone.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402

from kiln.log import setup_logging  # noqa: E402
from tensor_parallel import runtime  # noqa: E402
from trainer import losses  # noqa: E402
from trainer.config import load_run_config  # noqa: E402
from trainer.loop import build_trainer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "trainer", "configs")
PACKED = os.path.join(CONFIGS, "data", "sample-sft-packed")
CASES = {
    "sft": ("sft", []),
    "sft_packed": ("sft", [f"data.manifests=[{PACKED}]"]),
    # the packed-sequence (THD, cu_seqlens) path megatron runs under Transformer Engine
    "sft_packed_thd": ("sft", [f"data.manifests=[{PACKED}]", "sft.packed_attention=thd",
                               "train.micro_batch_size=1"]),
    "rm": ("rm", ["rm.use_margin=false", "rm.center_rewards_coefficient=0.01"]),
    "dpo": ("dpo", []),
    "orpo": ("orpo", []),
    "simpo": ("simpo", []),
    "kto": ("kto", ["kto.desirable_weight=1.3"]),
}
# DPO variants share one model and reference: (loss_type, label_smoothing)
DPO_VARIANTS = {"dpo_sigmoid": ("sigmoid", 0.1), "dpo_ipo": ("ipo", 0.0),
                "dpo_hinge": ("hinge", 0.0), "dpo_robust": ("robust", 0.2)}


def gathered(logits: torch.Tensor) -> torch.Tensor:
    """[b, s, V/TP] on each rank -> the full [b, s, V], by a plain all-gather."""
    parts = [torch.empty_like(logits) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def independent_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    full = gathered(logits).double()
    return torch.log_softmax(full, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def sequence_sums(logps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (logps * mask).sum(-1), mask.double().sum(-1)


def independent_loss(name: str, opts, output: torch.Tensor, batch, ref: torch.Tensor | None) -> float:
    mask = batch["loss_mask"].double()
    if name == "rm":
        last = [int(np.nonzero(m.cpu().numpy())[0].max()) for m in mask]
        rewards = torch.stack([output[i, t] for i, t in enumerate(last)]).double()
        b = len(last) // 2
        loss, _ = losses.reward_model_loss(rewards[:b], rewards[b:],
                                           center_rewards_coefficient=opts.center_rewards_coefficient)
        return float(loss)
    logps = independent_logps(output, batch["labels"])
    if name.startswith("sft"):
        return float(-(logps * mask).sum() / mask.sum())
    sums, lengths = sequence_sums(logps, mask)
    b = len(sums) // 2
    (c, r), (cl, rl) = (sums[:b], sums[b:]), (lengths[:b], lengths[b:])
    if name.startswith("dpo"):
        loss, _ = losses.dpo_loss(c, r, ref[:b], ref[b:], beta=opts.beta, loss_type=opts.loss_type,
                                  label_smoothing=opts.label_smoothing, chosen_lengths=cl,
                                  rejected_lengths=rl)
    elif name == "orpo":
        loss, _ = losses.orpo_loss(c / cl, r / rl, -c.sum() / cl.sum(), beta=opts.beta)
    elif name == "simpo":
        loss, _ = losses.simpo_loss(c / cl, r / rl, beta=opts.beta, gamma=opts.gamma)
    else:  # kto: examples then KL partners
        kl = losses.kto_kl_baseline(r, ref[b:])
        loss, _ = losses.kto_loss(c, ref[:b], batch["label"], kl, beta=opts.beta,
                                  desirable_weight=opts.desirable_weight,
                                  undesirable_weight=opts.undesirable_weight)
    return float(loss)


def packed_vs_separate(t) -> float:
    """Max |log-prob difference| between a packed row and its conversations run one by one."""
    stage, chunk = t.stage, t.model[0]
    row = next(i for i in stage.train_rows if len(stage.data.row(int(i))["seq_boundaries"]) > 2)
    batch = stage.batch(np.array([row]))
    packed = independent_logps(stage.forward(chunk, batch), batch["labels"])[0]
    bounds = stage.data.row(int(row))["seq_boundaries"]
    worst = 0.0
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        hi = min(int(hi), batch["tokens"].shape[1])
        if hi - lo < 2:
            continue
        tokens = batch["tokens"][:, lo:hi]
        alone = chunk(input_ids=tokens, position_ids=torch.arange(hi - lo).unsqueeze(0),
                      attention_mask=None)
        logps = independent_logps(alone, batch["labels"][:, lo:hi])[0]
        # the segment's last label is the next conversation's first token: not trained on
        worst = max(worst, float((logps[:-1] - packed[lo:hi - 1]).abs().max()))
    return worst


def run_case(name: str, stage_name: str, overrides: list[str], run_dir: str) -> dict:
    # no warm-up: the first step's learning rate is not 0, so the policy leaves the reference
    cfg = load_run_config(os.path.join(CONFIGS, f"tiny-{stage_name}.yaml"),
                          [*overrides, "parallel.tp=2", "checkpoint.save=false",
                           "schedule.warmup_steps=0", f"run_dir={run_dir}"])
    runtime.init(tp=2, seed=cfg.train.seed)
    t = build_trainer(cfg)
    stage = t.stage
    batch = next(stage.train_batches(0))
    stage.before_step(0, t.model)
    result: dict = {}
    with torch.no_grad():
        start = stage.forward(t.model[0], batch)
        if getattr(stage, "reference", None) is not None:
            sums, _ = sequence_sums(independent_logps(start, batch["labels"]),
                                    batch["loss_mask"].double())
            stored = stage.reference.lookup(batch["index"]).T.reshape(-1)
            result["reference_diff"] = float((stored - sums).abs().max())
            ref = sums
        else:
            ref = None
        if name.startswith("sft_packed"):
            result["packed_diff"] = packed_vs_separate(t)
            result["cu_seqlens"] = "cu_seqlens" in stage.batch(stage.train_rows[:1])
    t.train_step(stage.train_batches(cfg.train.global_batch_size))
    variants = DPO_VARIANTS if name == "dpo" else {name: None}
    with torch.no_grad():
        output = stage.forward(t.model[0], batch)
        for variant, setting in variants.items():
            if setting is not None:
                stage.opts.loss_type, stage.opts.label_smoothing = setting
            loss_sum, count, _ = stage.loss(output, batch)
            result[variant] = {"stage": float(loss_sum / count),
                               "independent": independent_loss(variant, stage.opts, output, batch,
                                                               ref)}
    runtime.shutdown(keep_process_group=True)
    return result


def main() -> None:
    setup_logging("WARNING")
    out = sys.argv[1]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (stage_name, overrides) in CASES.items():
            results[name] = run_case(name, stage_name, overrides, os.path.join(tmp, name))
    if runtime.rank() == 0:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    runtime.shutdown()


if __name__ == "__main__":
    main()
