"""Hugging Face checkpoints in and out: `kiln import-hf` (HF Llama/Mistral/Qwen2 -> megatron
distributed checkpoint + trainer config) and `kiln export-hf` (any checkpoint -> HF directory)."""
