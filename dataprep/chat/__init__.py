"""Chat data: format readers, the chat template, length policy, packing and hygiene for SFT,
preference, unpaired (KTO) and prompt-only datasets."""
