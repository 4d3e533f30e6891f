"""Training data readers: pretraining token shards (`pretrain`) and their manifests."""
