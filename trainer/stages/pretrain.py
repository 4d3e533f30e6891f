"""Pretraining: next-token cross-entropy on blended Megatron token shards."""

from __future__ import annotations

import os
from collections.abc import Iterator

from kiln.errors import ConfigError
from tensor_parallel import runtime
from trainer import checkpoint
from trainer.data.pretrain import TokenData, build_token_data, micro_batches
from trainer.stages import Batch, Stage


class PretrainStage(Stage):
    name = "pretrain"
    context_parallel = True

    def setup(self) -> None:
        cfg = self.cfg
        train, data = cfg.train, cfg.data
        samples = train.steps * train.global_batch_size
        resumed = checkpoint.resume_position(cfg)
        if resumed is not None:  # a resume under another global batch reads past steps × batch
            step, consumed = resumed
            samples = max(samples, consumed + max(train.steps - step, 0) * train.global_batch_size)
        self.data: TokenData = build_token_data(
            data.manifests, data.weights, data.split, seq_length=train.seq_length,
            seed=train.seed, train_samples=samples,
            # every evaluation reads the same first eval_batches global batches, so validation
            # losses compare across evaluations and across runs of other lengths
            valid_samples=train.eval_batches * train.global_batch_size,
            cache_dir=os.path.join(cfg.run_dir, "cache", "data"),
            eod_mask_loss=data.eod_mask_loss, fingerprint=data.tokenizer_fingerprint)

    def vocab_size(self) -> int:
        configured = self.cfg.model.vocab_size
        if configured is not None and configured < self.data.vocab_size:
            raise ConfigError("model.vocab_size", f"{configured} is smaller than the data's "
                              f"tokenizer vocabulary ({self.data.vocab_size})")
        return configured or self.data.vocab_size

    def _batches(self, dataset, start_sample: int) -> Iterator[Batch]:
        return micro_batches(dataset, start_sample=start_sample,
                             micro_batch_size=self.cfg.train.micro_batch_size,
                             dp_rank=runtime.dp_rank(), dp_size=runtime.dp_size())

    def train_batches(self, start_sample: int) -> Iterator[Batch]:
        return self._batches(self.data.train, start_sample)

    def valid_batches(self) -> Iterator[Batch] | None:
        return self._batches(self.data.valid, 0) if self.data.valid is not None else None


STAGE = PretrainStage
