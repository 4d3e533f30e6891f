"""Supervised fine-tuning: next-token loss on the assistant tokens only (the shards' loss mask),
summed per token and divided by the tokens of the whole global batch; plain or packed rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from kiln.errors import ConfigError
from tensor_parallel import runtime
from trainer.chat_data import Batch as ArrayBatch
from trainer.chat_data import collate_sft
from trainer.losses import masked_nll
from trainer.stages import Batch, LossOutput
from trainer.stages.chat_common import ChatOptions, ChatStage, token_logps


@dataclass
class SftOptions(ChatOptions):
    # How packed rows keep conversations apart: "thd" passes cu_seqlens (megatron's packed-sequence
    # path: Transformer Engine on GPU, SDPA on CPU; one packed row per micro-batch), "mask" a
    # block-diagonal attention mask (local spec); "auto": thd under Transformer Engine, else mask.
    packed_attention: Literal["auto", "thd", "mask"] = "auto"


class SftStage(ChatStage):
    name = "sft"
    options = SftOptions
    contracts = ("sft", "sft_packed")
    context_parallel = True

    def setup(self) -> None:
        super().setup()
        m = self.cfg.model
        self.packed = self.data.contract == "sft_packed"
        # Transformer Engine takes packed rows as cu_seqlens (THD); the local spec takes the
        # block-diagonal boolean mask (which megatron's own core attention, with its fused causal
        # softmax in bf16 on GPU, ignores; SDPA applies it) or THD through SDPA.
        te = m.transformer_impl == "transformer_engine"
        mode = self.opts.packed_attention
        if mode == "mask" and te:
            raise ConfigError("sft.packed_attention", "Transformer Engine takes packed rows as "
                              "cu_seqlens: use thd (or auto)")
        if mode == "thd" and not te and m.local_attention != "sdpa":
            raise ConfigError("sft.packed_attention", "thd on the local spec needs "
                              "model.local_attention=sdpa")
        self.cu_seqlens = self.packed and (mode == "thd" or (mode == "auto" and te))
        if self.cu_seqlens and self.cfg.parallel.cp > 1:
            raise ConfigError("parallel.cp", "packed rows as cu_seqlens (THD) are not split over "
                              "context-parallel ranks: use parallel.cp=1 (or, on the local spec, "
                              "sft.packed_attention=mask)")
        if self.cu_seqlens and self.cfg.train.micro_batch_size != 1:
            raise ConfigError("train.micro_batch_size", "packed rows as cu_seqlens (THD) take "
                              "micro_batch_size=1 (one packed row per micro-batch)")
        if (self.packed and not self.cu_seqlens and runtime.on_gpu() and m.precision == "bf16"
                and m.local_attention == "megatron"):
            raise ConfigError("model.local_attention", "packed rows in bf16 on GPU need masks "
                              "that megatron's fused softmax ignores: use sdpa (or "
                              "transformer_engine)")

    def collate(self, indices: np.ndarray) -> ArrayBatch:
        return collate_sft(self.data.rows(indices), self.seq_len(), self.pad_id,
                           max_len=self.cfg.train.seq_length)

    def batch(self, indices: np.ndarray) -> Batch:
        batch = super().batch(indices)
        if self.cu_seqlens:
            s = batch["tokens"].shape[1]
            bounds = np.minimum(np.asarray(self.data.row(int(indices[0]))["seq_boundaries"]), s)
            cu = np.unique(np.append(bounds, s)).astype(np.int32)  # padding: its own segment
            batch.pop("attention_mask")
            batch["cu_seqlens"] = torch.from_numpy(cu).to(runtime.device())
        return batch

    def forward(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        if "cu_seqlens" not in batch:
            return super().forward(model, batch)
        from megatron.core.packed_seq_params import PackedSeqParams

        cu = batch["cu_seqlens"]
        longest = int((cu[1:] - cu[:-1]).max())
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                 max_seqlen_q=longest, max_seqlen_kv=longest)
        return model(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                     attention_mask=None, packed_seq_params=params)

    def loss(self, output: torch.Tensor, batch: Batch) -> LossOutput:
        # L = -(1/N) Σ_t m_t log π(y_t | y_<t); the loop divides by N over the global batch
        nll_sum, count = masked_nll(token_logps(output, batch["labels"]), batch["loss_mask"])
        return nll_sum, count.to(torch.int), {}


STAGE = SftStage
