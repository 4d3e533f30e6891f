"""The megatron-core trainer: config, model, data, stages, the shared loop, checkpoints."""
